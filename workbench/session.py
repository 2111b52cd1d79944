"""Session: one model + one prompt, kept warm so that a control change shows its consequence in milliseconds.

Design choices:
- The session keeps, for the baseline and for the current controls, the residual stream entering every layer, the
  chosen experts of every MoE layer, the logits and (when a continuation is asked for) the latent KV cache after the
  prompt. `apply(controls)` finds the first layer whose effective controls differ from the current ones and re-runs
  only from there, on the stored residual; layers before it are, by construction, unchanged.
- Everything a run produces lives in one immutable `_State`, swapped in a single assignment: readers never see half
  of an update, and a run that fails leaves the previous state in place.
- Rapid updates (a slider): each request takes a generation number; runs are serialised by a lock, and a request
  that finds a newer one queued gives way (returns None) instead of running. The latest request always runs.
- Comparisons are always against the baseline: KL of the next-token distribution, top tokens, per-token loss,
  the fraction of changed expert choices per MoE layer, for sparse attention (V3.2, V4 CSA) the fraction of changed
  indexer selections per layer, and a greedy continuation.
- DeepSeek-V4 runs the same way: its stored residual is the streams [1, S, n, H], the prompt's token ids travel
  with every re-run (hash-routed layers read them), and its cache is a `V4Cache`, cloned and rewound as MLA's is.

Shape legend: S prompt tokens, H hidden, V vocab, k experts per token, C kv_lora_rank, n continuation tokens,
N keys (V3.2: the S prompt tokens) or compressed entries (V4 CSA: S // 4) a query's indexer chooses from.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F

from workbench.controls import ControlError, Controls, svd_basis
from workbench.controls.attention import has_indexer
from workbench.model.block import Block, LayerControls
from workbench.model.fp8_linear import FP8Linear
from workbench.model.mla import AttnMode
from workbench.model.transformer import DeepSeekModel, ModelCache
from workbench.model.v4.cache import V4Cache
from workbench.run_lock import model_lock
from workbench.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenProb:
    token_id: int
    text: str
    prob: float


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    """What a set of controls changed, compared with the baseline run of the same prompt."""

    generation: int  # request number; 0 is the baseline
    controls: Controls
    start_layer: int  # first layer re-run (num_hidden_layers: nothing needed re-running)
    kl: float  # KL(baseline || now) of the next-token distribution after the prompt, in nats
    top_before: tuple[TokenProb, ...]
    top_after: tuple[TokenProb, ...]
    loss_delta: torch.Tensor  # [S-1] per-token loss now minus baseline (token t+1 predicted at t)
    expert_change: Mapping[int, float]  # MoE layer -> fraction of expert choices that differ from the baseline
    continuation_before: tuple[int, ...]
    continuation_after: tuple[int, ...]
    continuation_text_before: str
    continuation_text_after: str
    logits: torch.Tensor  # [S, V] fp32, now
    elapsed_ms: float
    # indexed layer (V3.2: all; V4: CSA) -> fraction of the keys / compressed entries each query reads that differ
    # from the baseline's (dense attention reads every visible one, a dropped compressed branch none)
    selection_change: Mapping[int, float] = dataclasses.field(default_factory=dict)
    # apply(..., continuation=False): the report came first; continuation_after is () until `finish_continuation`
    continuation_pending: bool = False


@dataclasses.dataclass(frozen=True)
class _State:
    controls: Controls
    resolved: Mapping[int, LayerControls]
    residuals: tuple[torch.Tensor, ...]  # per layer, the block's input [1, S, H]
    expert_ids: Mapping[int, torch.Tensor]  # MoE layer -> [S, k]
    selections: Mapping[int, torch.Tensor]  # indexed layer -> [S, N] bool, the keys / entries each query reads
    logits: torch.Tensor  # [S, V]
    cache: ModelCache | None  # after the prompt; cloned before any decode
    continuation: tuple[int, ...] | None  # None: not decoded yet (a report-first apply)
    result: ApplyResult | None


class Session:
    """A live model + prompt. `apply(controls)` re-runs from the first layer the change touches.

    Args:
        model: the model; the session only reads it (no parameters or modules are changed).
        prompt: text (needs `tokenizer`; BOS is prepended when the config has one) or the integer token ids of one
            sequence, shape [S] or [1, S] (float ids and batches are refused, not rounded or cut to one row).
        tokenizer: turns text into ids and ids back into text for the reports.
        continuation: greedy tokens generated after the prompt before/after (0 skips it and the KV cache).
        top: how many top tokens to report (an int >= 1; more than the vocabulary reports all of it).
        calibration: text or ids whose latents give the SVD bases for latent truncation (default: the prompt).
        mode: attention computation, "naive" (the reference) or "absorb" (V4: its "fast" gathered path).
    """

    def __init__(self, model: DeepSeekModel, prompt: str | Sequence[int] | torch.Tensor, tokenizer: Tokenizer | None = None,
                 *, continuation: int = 8, top: int = 5, calibration: str | Sequence[int] | torch.Tensor | None = None,
                 mode: AttnMode = "naive") -> None:
        _need_count("continuation", continuation, 0)
        _need_count("top", top, 1)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.n_continue, self.top, self.mode = continuation, top, mode
        self.input_ids = self._encode(prompt, "prompt")  # [1, S]
        if self.input_ids.shape[1] < 2:
            raise ValueError("the prompt needs at least 2 tokens (one to predict from, one to predict)")
        model.check_input(self.input_ids, past=continuation)  # the prompt plus its continuation must fit
        self._param = next(model.parameters())
        self._run_lock = model_lock(model)  # runs listen on the model's probes: one run of this model at a time
        self._request_lock = threading.Lock()
        self._requested = 0
        calib_latents: dict[int, torch.Tensor] = {}
        self._indexed = tuple(i for i in range(self.config.num_hidden_layers) if has_indexer(self.config, i))
        with self._run_lock:  # V4 has no MLA latent: no latents to capture, no SVD bases
            self.baseline = self._run(None, Controls(), {}, 0, latents=None if self.config.is_v4 else calib_latents)
            if calibration is not None and not self.config.is_v4:
                calib_latents.clear()
                self._capture_latents(self._encode(calibration, "calibration"), calib_latents)
        self.svd_bases = {layer: svd_basis(lat) for layer, lat in calib_latents.items()}  # layer -> [C, C]
        self._base_stats = self._stats(self.baseline)  # the baseline's side of every comparison, computed once
        baseline_result = self._compare(self.baseline, 0, self.config.num_hidden_layers, 0.0)
        self._state = dataclasses.replace(self.baseline, result=baseline_result)

    # ------------------------------------------------------------------ public
    @property
    def controls(self) -> Controls:
        return self._state.controls

    @property
    def result(self) -> ApplyResult:
        result = self._state.result
        assert result is not None
        return result

    @property
    def expert_ids(self) -> Mapping[int, torch.Tensor]:
        """MoE layer -> the experts each prompt token chose under the current controls [S, k]."""
        return self._state.expert_ids

    @property
    def generation(self) -> int:
        """Number of the latest accepted request (the one the session will end up showing)."""
        return self._requested

    def apply(self, controls: Controls | Mapping[str, Any] | str, *, continuation: bool = True) -> ApplyResult | None:
        """Validate and run `controls`; None when a newer request arrived before this one could start.

        `continuation=False` reports without decoding the continuation (most of an apply's time on a short prompt:
        it decodes token by token): the result has `continuation_pending` set, and `finish_continuation` adds it.
        Raises ControlError (a ValueError) for impossible settings, before anything changes.
        """
        controls = _as_controls(controls)
        resolved = self._resolve(controls)
        with self._request_lock:
            self._requested += 1
            generation = self._requested
        with self._run_lock:
            if generation != self._requested:
                return None  # superseded while queued: the newer request will run
            t0 = time.perf_counter()
            state = self._state
            start = controls.first_difference(state.controls, self.config)
            if start == self.config.num_hidden_layers:  # same effect as now (e.g. a key moved to "all")
                new = dataclasses.replace(state, controls=controls, resolved=resolved)
            else:
                new = self._run(state, controls, resolved, start, decode=continuation)
            if continuation and new.continuation is None:  # an earlier report-first apply left it undecoded
                new = dataclasses.replace(new, continuation=self._continue(new.logits[-1], new.cache, resolved))
            result = self._compare(new, generation, start, (time.perf_counter() - t0) * 1e3)
            self._state = dataclasses.replace(new, result=result)
            return result

    def finish_continuation(self, generation: int) -> ApplyResult | None:
        """Decode the continuation a report-first `apply` (generation `generation`) left out; the completed result,
        or None when a newer apply has replaced that one (its own continuation is then the one to finish)."""
        with self._run_lock:
            state = self._state
            if state.result is None or state.result.generation != generation:
                return None
            if state.continuation is not None:
                return state.result
            t0 = time.perf_counter()
            tokens = self._continue(state.logits[-1], state.cache, state.resolved)
            result = dataclasses.replace(state.result, continuation_after=tokens,
                                         continuation_text_after=self._decode(tokens), continuation_pending=False,
                                         elapsed_ms=state.result.elapsed_ms + (time.perf_counter() - t0) * 1e3)
            self._state = dataclasses.replace(state, continuation=tokens, result=result)
            return result

    def reset(self) -> ApplyResult | None:
        """Back to the baseline (no controls)."""
        return self.apply(Controls())

    def full_run(self, controls: Controls | Mapping[str, Any] | str) -> ApplyResult:
        """Run `controls` from layer 0 without touching the session: the reference an incremental re-run must equal."""
        controls = _as_controls(controls)
        resolved = self._resolve(controls)
        t0 = time.perf_counter()
        with self._run_lock:
            state = self._run(None, controls, resolved, 0)
        return self._compare(state, -1, 0, (time.perf_counter() - t0) * 1e3)

    # ------------------------------------------------------------------ running
    def _resolve(self, controls: Controls) -> dict[int, LayerControls]:
        replay = controls.routing_replay
        if replay is not None and replay.token_ids != tuple(self.input_ids[0].tolist()):
            raise ControlError(f"replay of {replay.source or 'an in-memory trace'} (seq {replay.seq}): it recorded "
                               f"{len(replay.token_ids)} tokens {_head(replay.token_ids)}, this session's prompt is "
                               f"{self.input_ids.shape[1]} tokens {_head(self.input_ids[0].tolist())}")
        resolved = controls.resolve(self.config, svd_bases=self.svd_bases, dtype=self._param.dtype,
                                    device=self._param.device, checkpoint=self.model.checkpoint_digest)
        if self.mode == "absorb" and not self.config.is_v4 and any(lc.fp8_sites is not None for lc in resolved.values()):
            for layer, lc in resolved.items():
                block = cast("Block", self.model.layers[layer])
                in_fp8 = isinstance(block.self_attn.kv_b_proj, FP8Linear)
                if lc.fp8_sites is not None and ("kv_b_proj" in lc.fp8_sites) != in_fp8:
                    raise ControlError(f"fp8 for layer {layer}: kv_b_proj cannot be switched per run in absorb "
                                       "mode; use mode='naive' or enable_fp8 on the model")
        return resolved

    @torch.no_grad()
    def _run(self, prev: _State | None, controls: Controls, resolved: Mapping[int, LayerControls], start: int,
             latents: dict[int, torch.Tensor] | None = None, decode: bool = True) -> _State:
        """Layers start.. under `controls` on `prev`'s residuals (from the embedding when prev is None); the
        continuation too unless `decode` is False."""
        model = self.model
        S = self.input_ids.shape[1]
        kept_residuals: tuple[torch.Tensor, ...] = ()
        if prev is None:
            start, x = 0, model.embed_tokens(self.input_ids)  # [1, S, H]
            if self.config.is_v4:
                x = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()  # [1, S, n, H] streams
            expert_ids: dict[int, torch.Tensor] = {}
            selected: dict[int, torch.Tensor] = {}
            cache = model.new_cache(1, S + self.n_continue) if self.n_continue else None
        else:
            x, kept_residuals = prev.residuals[start], prev.residuals[:start]
            expert_ids = {layer: ids for layer, ids in prev.expert_ids.items() if layer < start}
            selected = {layer: mask for layer, mask in prev.selections.items() if layer < start}
            cache = _clone_cache(prev.cache) if prev.cache is not None else None
        if cache is not None:
            _rewind(cache)  # layers before `start` keep their entries; the rest are rewritten at 0..S
        residuals: list[torch.Tensor] = []
        names = [f"blocks.{layer}.mlp.hook_expert_indices" for layer in self.config.moe_layers if layer >= start]
        names += [f"blocks.{layer}.attn.hook_index_selected" for layer in self._indexed if layer >= start]
        if latents is not None:
            names += [f"blocks.{layer}.attn.hook_kv_latent" for layer in range(self.config.num_hidden_layers)]
        picks: dict[int, torch.Tensor] = {}  # indexed layer -> [S, k] what its indexer chose
        collect = _Collector(expert_ids, latents, picks).listener
        with model.probes.listen(names, collect, own_thread=True) if names else nullcontext():
            logits = model.forward_from(start, x, cache=cache, mode=self.mode, controls=resolved, residuals=residuals,
                                        input_ids=self.input_ids)
        for layer in self._indexed:
            if layer >= start:
                selected[layer] = self._selection_mask(layer, picks.get(layer), resolved.get(layer))
        continuation = self._continue(logits[0, -1], cache, resolved) if decode else None
        return _State(controls, resolved, kept_residuals + tuple(residuals), expert_ids, selected, logits[0], cache,
                      continuation, None)

    def _selection_mask(self, layer: int, picks: torch.Tensor | None, lc: LayerControls | None) -> torch.Tensor:
        """[S, N] bool: the keys (V3.2) or compressed entries (V4 CSA) each prompt query read in `layer`.

        `picks` [S, k] (-1: none) is what the indexer chose; V4 runs no indexer under dense attention (every
        visible entry is read) or with the compressed branch off (none is)."""
        S = self.input_ids.shape[1]
        N = S // 4 if self.config.is_v4 else S
        if picks is not None:
            hits = torch.zeros(S, N + 1, dtype=torch.bool)
            return hits.scatter_(1, torch.where(picks >= 0, picks, N).cpu(), True)[:, :N]
        if lc is not None and not lc.use_compressed:
            return torch.zeros(S, N, dtype=torch.bool)
        t = torch.arange(S)[:, None]
        return torch.arange(N)[None] < (t + 1) // 4 if self.config.is_v4 else torch.arange(N)[None] <= t

    def _continue(self, last: torch.Tensor, cache: ModelCache | None,
                  resolved: Mapping[int, LayerControls]) -> tuple[int, ...]:
        """Greedy tokens after the prompt, decoded on a copy of the prompt's cache (the stored one stays prompt-only)."""
        if cache is None or self.n_continue == 0:
            return ()
        cache = _clone_cache(cache)
        # a replayed routing covers the prompt only: new tokens are routed by the gate (other controls still apply)
        decode = {layer: dataclasses.replace(lc, routing=dataclasses.replace(lc.routing, replay_ids=None,
                                                                             replay_weights=None))
                  if lc.routing is not None and lc.routing.replay_ids is not None else lc
                  for layer, lc in resolved.items()}
        out = [int(last.argmax())]
        while len(out) < self.n_continue:
            step = torch.tensor([[out[-1]]], device=self.input_ids.device)  # [1, 1]
            out.append(int(self.model(step, cache=cache, mode=self.mode, controls=decode)[0, -1].argmax()))
        return tuple(out)

    @torch.no_grad()
    def _capture_latents(self, ids: torch.Tensor, latents: dict[int, torch.Tensor]) -> None:
        names = [f"blocks.{layer}.attn.hook_kv_latent" for layer in range(self.config.num_hidden_layers)]
        with self.model.probes.listen(names, _Collector({}, latents).listener, own_thread=True):
            self.model(ids, mode=self.mode)

    # ------------------------------------------------------------------ reporting
    def _compare(self, state: _State, generation: int, start: int, elapsed_ms: float) -> ApplyResult:
        base = self.baseline
        loss_base, logp_base, top_base = self._base_stats
        loss_now, logp_now, top_now = self._stats(state)
        kl = float((logp_base.exp() * (logp_base - logp_now)).sum())
        change = {layer: _changed_fraction(base.expert_ids[layer], state.expert_ids[layer], self.config.n_routed_experts)
                  for layer in self.config.moe_layers}
        picks = {layer: _changed_selection(base.selections[layer], state.selections[layer]) for layer in self._indexed}
        after = state.continuation if state.continuation is not None else ()
        return ApplyResult(generation, state.controls, start, kl, top_base, top_now, loss_now - loss_base, change,
                           base.continuation or (), after, self._decode(base.continuation or ()),
                           self._decode(after), state.logits, elapsed_ms, picks,
                           continuation_pending=state.continuation is None and self.n_continue > 0)

    def _stats(self, state: _State) -> tuple[torch.Tensor, torch.Tensor, tuple[TokenProb, ...]]:
        """Per-token loss [S-1], next-token log-probs [V] and top tokens of one run."""
        loss = F.cross_entropy(state.logits[:-1], self.input_ids[0, 1:], reduction="none")  # [S-1]
        logp = state.logits[-1].log_softmax(-1)  # [V]
        return loss, logp, self._top(logp)

    def _top(self, logp: torch.Tensor) -> tuple[TokenProb, ...]:
        values, ids = logp.exp().topk(min(self.top, logp.numel()))
        return tuple(TokenProb(int(i), self._token_text(int(i)), float(v)) for v, i in zip(values, ids, strict=True))

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer is not None else f"<{token_id}>"

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(list(ids))

    def _encode(self, prompt: str | Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        """Text or ids -> [1, S] int64. Ids are never rounded (a float tensor is refused) and a batch is refused:
        every comparison the session reports is of one sequence."""
        device = next(self.model.parameters()).device
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"a text {what} needs a tokenizer (or pass token ids)")
            bos = self.config.bos_token_id
            ids = ([bos] if bos is not None else []) + self.tokenizer.encode(prompt)
            return torch.tensor([ids], dtype=torch.long, device=device)
        t = torch.as_tensor(prompt)
        if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{what} token ids must be integers, got {t.dtype} values (ids are never rounded)")
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(f"a session takes one sequence: the {what} must have shape [S] or [1, S], "
                             f"got shape {list(t.shape)}")
        return t.to(device=device, dtype=torch.long)


class _Collector:
    """Probe listener that records expert ids / indexer picks / latents; attached with own_thread, so other threads'
    runs pass."""

    def __init__(self, expert_ids: dict[int, torch.Tensor], latents: dict[int, torch.Tensor] | None,
                 picks: dict[int, torch.Tensor] | None = None) -> None:
        self.expert_ids, self.latents, self.picks = expert_ids, latents, picks

    def listener(self, name: str, value: torch.Tensor) -> None:
        layer = int(name.split(".")[1])
        if name.endswith("hook_expert_indices"):
            self.expert_ids[layer] = value.detach()  # [S, k]
        elif name.endswith("hook_index_selected"):
            if self.picks is not None:
                self.picks[layer] = value.detach()[0]  # [S, k], -1: none
        elif self.latents is not None:
            self.latents[layer] = value.detach().reshape(-1, value.shape[-1])  # [S, C]


def _need_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _changed_fraction(before: torch.Tensor, after: torch.Tensor, n_experts: int) -> float:
    """Mean over tokens of 1 - |chosen before ∩ chosen now| / max(k before, k now); order inside top-k ignored."""
    hot_before = torch.zeros(before.shape[0], n_experts, dtype=torch.bool).scatter_(1, before.cpu(), True)  # [S, E]
    hot_after = torch.zeros(after.shape[0], n_experts, dtype=torch.bool).scatter_(1, after.cpu(), True)  # [S, E]
    same = (hot_before & hot_after).sum(-1).float()  # [S]
    return float((1 - same / max(before.shape[1], after.shape[1])).mean())


def _changed_selection(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over queries of 1 - |read before ∩ read now| / max(|before|, |now|), [S, N] bool masks; queries that
    read nothing either time (no compressed entry visible yet) are left out; 0.0 when none is left."""
    same = (before & after).sum(-1).float()  # [S]
    most = torch.maximum(before.sum(-1), after.sum(-1)).float()  # [S]
    used = most > 0
    return float((1 - same[used] / most[used]).mean()) if bool(used.any()) else 0.0


def _clone_cache(cache: ModelCache) -> ModelCache:
    if isinstance(cache, V4Cache):
        return copy.deepcopy(cache)  # rings, compressor buffers and entries: every tensor copied
    out = copy.copy(cache)
    out.c_kv, out.k_pe = cache.c_kv.clone(), cache.k_pe.clone()
    if cache.index_keys is not None:  # V3.2's indexer keys
        out.index_keys = cache.index_keys.clone()
    return out


def _rewind(cache: ModelCache) -> None:
    """Length 0, so the layers a run re-runs write their state from position 0 (the others keep theirs)."""
    cache.length = 0
    if isinstance(cache, V4Cache):
        for layer in cache.layers:
            layer.length = 0


def _head(ids: Sequence[int], n: int = 8) -> str:
    return "[" + ", ".join(map(str, list(ids)[:n])) + (", ...]" if len(ids) > n else "]")


def _as_controls(controls: Controls | Mapping[str, Any] | str) -> Controls:
    if isinstance(controls, Controls):
        return controls
    if isinstance(controls, str):
        return Controls.from_json(controls)
    return Controls.from_dict(controls)

