"""LiveSession: the one `Session` the views share, with the controls each view owns composed into one `Controls`.

Design choices:
- The tuner owns the routing controls, the KV view the latent and sparse-attention ones (V3.2/V4: the indexer's
  budget, V4's window and compressed branch), the mHC view V4's identity mixing; all go through `update`, which
  validates the composed controls before anything runs, so an impossible setting raises `ControlError` and the
  session keeps showing the last valid state (nothing is lost).
- A slider fires many changes per second. `LatestWins` runs them on a worker thread, latest wins: an idle session
  starts at once (no fixed debounce delay), changes that arrive during a run become one run after it, and a run
  whose result a newer change has made stale does not report. With `background=False` everything runs
  synchronously, which is what tests and scripts want.
- Report first: a run applies the controls without decoding the greedy continuation (token-by-token decoding was
  most of an apply on a short prompt) and tells `on_result` listeners at once; then, unless a newer change is
  waiting, it decodes the continuation and tells `on_continuation` listeners (the tuner) the completed result.
- Whoever changes the model's modules (the FP8 view swaps linears) holds `lock`, so no session run sees a half
  swapped model.
Shape legend: S prompt tokens, L MoE layers, k top-k.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from workbench.controls import AttentionControl, Controls, LatentControl, LayerKey, RoutingControl
from workbench.loader import LoadedModel
from workbench.run_lock import model_lock
from workbench.session import ApplyResult, Session
from workbench.trace.recorder import trace as record_trace
from workbench.trace.schema import SCHEMA_VERSION, Layout, build_dataset

DEFAULT_PROMPT = ('def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\n'
                  "for i in range(3):\n    print(add(i, i))\n")

ResultListener = Callable[[ApplyResult], None]


class LatestWins:
    """Run `fn` for the newest request only: at once when idle; while a run is in flight, any number of requests
    become one run right after it. `background=False` runs every request in the caller's thread (tests, scripts).

    Why not a debounce: a fixed quiet period delays every change by that period even when the model is idle, and a
    change during a run still waits for it. Here an idle session starts at once, and `superseded()` lets the run tell
    that a newer request arrived meanwhile, so its result is never shown after a newer control was sent.
    """

    def __init__(self, fn: Callable[[], Any], background: bool) -> None:
        self.fn, self.background = fn, background
        self._lock = threading.Condition()
        self._pending = False  # a request arrived that no run has started on yet
        self._running = False

    def trigger(self) -> None:
        if not self.background:
            self.fn()
            return
        with self._lock:
            self._pending = True
            if self._running:
                return  # the worker picks it up when the current run ends
            self._running = True
        threading.Thread(target=self._work, daemon=True, name="workbench-live").start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._running = False
                    self._lock.notify_all()
                    return
                self._pending = False
            try:
                self.fn()
            except Exception:  # a view's listener failing must not stop the runs after it
                traceback.print_exc()

    def superseded(self) -> bool:
        """Whether a request arrived after the run in progress started (its result is already stale)."""
        with self._lock:
            return self._pending

    def flush(self) -> None:
        """Wait until every request has run (tests and exports want the settled state)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._running and not self._pending)


class LiveSession:
    """A model + prompt kept warm for the views; see the module docstring."""

    def __init__(self, loaded: LoadedModel, prompt: str | None = None, *, continuation: int = 4,
                 background: bool = False) -> None:
        self.loaded = loaded
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.model.config
        self.continuation = continuation
        self.lock = model_lock(self.model)  # shared by every session and view on this model
        self.routing: dict[LayerKey, RoutingControl] = {}
        self.latent: dict[LayerKey, LatentControl] = {}
        self.attention: dict[LayerKey, AttentionControl] = {}
        self.mhc_identity: dict[LayerKey, bool] = {}  # V4: True runs the layer's mHC mixing as the identity
        self._result_listeners: list[ResultListener] = []
        self._continuation_listeners: list[ResultListener] = []
        self._prompt_listeners: list[Callable[[], None]] = []
        self._error_listeners: list[Callable[[str], None]] = []
        self._routing_cache: tuple[tuple[int, int], xr.Dataset] | None = None
        self.scheduler = LatestWins(self._run, background)
        self.session = self._new_session(prompt if prompt is not None else DEFAULT_PROMPT)

    # ------------------------------------------------------------------ state
    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def input_ids(self) -> torch.Tensor:
        return self.session.input_ids  # [1, S]

    @property
    def result(self) -> ApplyResult:
        return self.session.result

    def controls(self) -> Controls:
        return Controls(routing=dict(self.routing), latent=dict(self.latent), attention=dict(self.attention),
                        mhc_identity=dict(self.mhc_identity))

    def _new_session(self, prompt: str) -> Session:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}")
        with self.lock:
            session = Session(self.model, prompt, self.tokenizer, continuation=self.continuation)
        self._prompt = prompt
        return session

    # ------------------------------------------------------------------ listeners
    def on_result(self, fn: ResultListener) -> None:
        self._result_listeners.append(fn)

    def on_continuation(self, fn: ResultListener) -> None:
        """`fn(result)` once the continuation of the result last reported is decoded (`continuation_pending`
        False); not called for a result a newer change made stale."""
        self._continuation_listeners.append(fn)

    def on_prompt(self, fn: Callable[[], None]) -> None:
        self._prompt_listeners.append(fn)

    def on_error(self, fn: Callable[[str], None]) -> None:
        self._error_listeners.append(fn)

    # ------------------------------------------------------------------ changes
    def update(self, *, routing: Mapping[LayerKey, RoutingControl | None] | None = None,
               latent: Mapping[LayerKey, LatentControl | None] | None = None,
               attention: Mapping[LayerKey, AttentionControl | None] | None = None,
               mhc_identity: Mapping[LayerKey, bool | None] | None = None) -> Controls:
        """Set (or, with None, clear) routing / latent / attention / mhc_identity entries; validates the composed
        controls first and raises ControlError without changing anything when they are impossible. The run itself is
        scheduled latest-wins (`LatestWins`)."""
        new_routing, new_latent, new_attention = dict(self.routing), dict(self.latent), dict(self.attention)
        new_identity = dict(self.mhc_identity)
        for target, changes in ((new_routing, routing), (new_latent, latent), (new_attention, attention),
                                (new_identity, mhc_identity)):
            for key, value in (changes or {}).items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value  # type: ignore[assignment]
        controls = Controls(routing=new_routing, latent=new_latent, attention=new_attention,
                            mhc_identity=new_identity).validate(self.config)
        self.routing, self.latent, self.attention = new_routing, new_latent, new_attention
        self.mhc_identity = new_identity
        self.scheduler.trigger()
        return controls

    def _run(self) -> None:
        try:
            with self.lock:
                result = self.session.apply(self.controls(), continuation=False)
        except ValueError as e:  # a control the session refused at run time (e.g. no SVD basis)
            for on_error in self._error_listeners:
                on_error(str(e))
            return
        if result is None or self.scheduler.superseded():  # stale: the run for the newer request will report
            return
        for on_result in self._result_listeners:
            on_result(result)
        if not result.continuation_pending or self.scheduler.superseded():
            return  # a newer change is waiting: its run decodes its own continuation
        with self.lock:
            full = self.session.finish_continuation(result.generation)
        if full is None or self.scheduler.superseded():
            return
        for on_continuation in self._continuation_listeners:
            on_continuation(full)

    def set_prompt(self, prompt: str) -> None:
        """A new prompt: a fresh session (new baseline), the current controls re-applied, every view refreshed."""
        self.scheduler.flush()
        session = self._new_session(prompt)
        with self.lock:
            self.session = session
            self._routing_cache = None
            if self.controls() != Controls():
                session.apply(self.controls())  # with its continuation: the views below show it whole
        for fn in self._prompt_listeners:
            fn()
        for listener in self._result_listeners:
            listener(self.session.result)

    # ------------------------------------------------------------------ traces of the prompt
    def routing_trace(self) -> xr.Dataset:
        """Routing of the prompt under the current controls as a trace Dataset (cached per session generation)."""
        with self.lock:
            key = (id(self.session), self.session.generation)
            if self._routing_cache is not None and self._routing_cache[0] == key:
                return self._routing_cache[1]
            ds = self._capture_routing(self.controls())
            self._routing_cache = (key, ds)
            return ds

    @torch.no_grad()
    def probe_run(self, sites: list[str], controls: Controls | None = None, *,
                  tokens: int | None = None) -> dict[str, torch.Tensor]:
        """One run of the prompt (its first `tokens` tokens; causal, so they read what they read in the whole
        prompt) under `controls` (default: the live ones), resolved as the session resolves them, with `sites`
        heard on this thread only and under the model's lock: site -> value, detached, on the CPU. What the views
        that draw from the probes (routing, sparse attention, mHC) capture with."""
        run = self.controls() if controls is None else controls
        got: dict[str, torch.Tensor] = {}
        with self.lock:
            resolved = run.resolve(self.config, svd_bases=self.session.svd_bases,
                                   dtype=next(self.model.parameters()).dtype, device=self.input_ids.device,
                                   checkpoint=self.model.checkpoint_digest)
            with self.model.probes.listen(sites, lambda name, v: got.__setitem__(name, v.detach().cpu()),
                                          own_thread=True):
                self.model(self.input_ids[:, :tokens], controls=resolved)
        return got

    @torch.no_grad()
    def _capture_routing(self, controls: Controls) -> xr.Dataset:
        """Expert ids and weights straight from the probes. Not through the recorder: its layout fixes k to the
        config's top-k, and a top_k control changes k (per layer, even), so slots are padded to the widest layer."""
        cfg = self.config
        names = [f"blocks.{layer}.mlp.hook_expert_{what}" for layer in cfg.moe_layers for what in ("indices", "weights")]
        got = self.probe_run(names, controls)
        S = self.input_ids.shape[1]
        k = max(got[f"blocks.{layer}.mlp.hook_expert_indices"].shape[-1] for layer in cfg.moe_layers)
        ids = np.full((S, len(cfg.moe_layers), k), -1, dtype=np.int16)  # [S, L, k]
        weights = np.full((S, len(cfg.moe_layers), k), np.nan, dtype=np.float32)  # [S, L, k]
        for i, layer in enumerate(cfg.moe_layers):
            layer_ids = got[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(S, -1)  # [S, k_layer]
            ids[:, i, : layer_ids.shape[1]] = layer_ids.numpy()
            weights[:, i, : layer_ids.shape[1]] = got[f"blocks.{layer}.mlp.hook_expert_weights"].reshape(S, -1).float().numpy()
        token_ids = self.input_ids[0].cpu().numpy().astype(np.int32)  # [S]
        layout = Layout(("expert_ids", "expert_weights"), tuple(cfg.moe_layers), cfg.num_hidden_layers, k,
                        cfg.n_routed_experts, cfg.kv_lora_rank, ())
        zeros = np.zeros(S, dtype=np.int32)
        arrays: dict[str, tuple[tuple[str, ...], Any]] = {
            "token_id": (("token",), token_ids), "doc": (("token",), zeros), "seq": (("token",), zeros),
            "pos": (("token",), np.arange(S, dtype=np.int32)),
            "text": (("token",), np.array([self.tokenizer.token_text(int(t)) for t in token_ids], dtype=object)),
            "expert_ids": (("token", "layer", "slot"), ids), "expert_weights": (("token", "layer", "slot"), weights)}
        return build_dataset(arrays, layout, {"schema_version": SCHEMA_VERSION, "complete": True,
                                              "layout": json.dumps(layout.to_json(), sort_keys=True),
                                              "model_config": json.dumps(cfg.to_hf_dict(), sort_keys=True),
                                              "checkpoint": self.loaded.digest, "controls": controls.to_json()})

    @torch.no_grad()
    def trace_prompt(self, sites: list[str], controls: Controls | None = None) -> xr.Dataset:
        """Run the prompt once under `controls` (default: none) with the trace recorder on `sites`."""
        resolved = (controls or Controls()).resolve(self.config, svd_bases=self.session.svd_bases,
                                                    dtype=next(self.model.parameters()).dtype,
                                                    device=self.input_ids.device)
        with self.lock, record_trace(self.model, sites=sites, tokenizer=self.tokenizer,
                                        checkpoint=self.loaded.digest,
                                        controls=(controls or Controls()).to_dict()) as t:
            self.model(self.input_ids, controls=resolved)
        return t.to_xarray()
