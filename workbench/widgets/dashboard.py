"""Workbench: the views on one live session (one model, one prompt, one set of controls) as tabs.

The tuner and the KV view write controls into the shared session; the routing explorer and the specialisation view
follow it when their source is "live"; the FP8 view compares on the same prompt; the sparse-attention view recaptures
what each query reads and the mHC view the stream-mixing matrices after every change. `set_prompt` swaps the prompt
for all of them at once. A new view is one more (title, view) pair in `views`.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import xarray as xr

from workbench.widgets.fp8_error import FP8Error
from workbench.widgets.hyper_connections import HyperConnections
from workbench.widgets.kv_compression import KVCompression
from workbench.widgets.live import LiveSession
from workbench.widgets.routing import RoutingExplorer
from workbench.widgets.routing_page import DEFAULT_PAGE_TOKENS
from workbench.widgets.sparse_attention import SparseAttention
from workbench.widgets.specialisation import ExpertSpecialisation
from workbench.widgets.trace_source import check_trace_matches, load_trace
from workbench.widgets.tuner import LiveTuner
from workbench.widgets.view import ModelArg, View, resolve_model


class Workbench(View):
    """The dashboard. `model`: a name, checkpoint path or LoadedModel; `trace`: a store path or Dataset recorded
    with that model (optional); `prompt`: the live session's text (default: a short mixed prose/code prompt);
    `background`: controls run on a worker thread, latest wins (`LatestWins`; False: in the caller's thread)."""

    title = "dashboard"

    def __init__(self, model: ModelArg = "default", *, trace: str | Path | xr.Dataset | None = None,
                 prompt: str | None = None, background: bool = True, page_tokens: int = DEFAULT_PAGE_TOKENS) -> None:
        loaded = resolve_model(model)
        ds = None
        if trace is not None:
            ds = load_trace(trace)
            check_trace_matches(ds, loaded)  # before anything slow runs
        self.live = LiveSession(loaded, prompt, background=background)
        self.tuner = LiveTuner(live=self.live)  # first, so its report is the first listener a result reaches
        self.routing = RoutingExplorer(trace=ds, live=self.live, page_tokens=page_tokens)
        self.specialisation = ExpertSpecialisation(trace=ds, live=self.live)
        self.kv = KVCompression(trace=ds, live=self.live)
        self.fp8 = FP8Error(trace=ds, live=self.live)
        self.sparse_attention = SparseAttention(live=self.live)
        self.hyper_connections = HyperConnections(live=self.live)
        # tab title -> view, in tab order
        self.views: dict[str, View] = {"Routing": self.routing, "Specialisation": self.specialisation,
                                       "KV compression": self.kv, "FP8 error": self.fp8, "Live tuner": self.tuner,
                                       "Sparse attention": self.sparse_attention, "mHC": self.hyper_connections}
        self.prompt_box = widgets.Textarea(self.live.prompt, description="prompt", rows=2,
                                           layout=widgets.Layout(width="70%"))
        self.prompt_button = widgets.Button(description="run prompt")
        self.prompt_error = widgets.HTML()
        self.tabs = widgets.Tab(children=list(self.views.values()), titles=list(self.views))
        cfg = loaded.model.config
        attention = (f"window {cfg.sliding_window}, compress ratios {list(cfg.compress_ratios[: cfg.num_hidden_layers])}, "
                     f"{cfg.num_hash_layers} hash-routed layers, {cfg.hc_mult} mHC streams" if cfg.is_v4 else
                     f"kv_lora_rank {cfg.kv_lora_rank}")
        header = widgets.HTML(
            f'<div class="wb-header"><b>MoE Workbench</b> · {loaded.name} · {cfg.num_hidden_layers} layers, '
            f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), {attention}"
            + (f" · trace: {int(ds.sizes['token'])} tokens" if ds is not None else "") + "</div>")
        super().__init__([header, widgets.HBox([self.prompt_box, self.prompt_button]), self.prompt_error, self.tabs])
        self.prompt_button.on_click(lambda _: self._prompt_clicked())
        self.tabs.observe(lambda _: self._tab_changed(), names="selected_index")
        self._tab_changed()

    def _tab_changed(self) -> None:
        """Only the selected tab refreshes on every live change; the others catch up when they are selected."""
        selected = self.tabs.selected_index or 0
        for i, view in enumerate(self.views.values()):
            view.set_shown(i == selected)

    def set_prompt(self, text: str) -> None:
        """Re-run the live session on `text` and refresh every view."""
        self.live.set_prompt(text)
        self.prompt_box.value = text

    def _prompt_clicked(self) -> None:
        try:
            self.set_prompt(self.prompt_box.value)
        except ValueError as e:
            self.prompt_error.value = f'<div class="wb-error" style="color:#b00">prompt: {e}</div>'
            return
        self.prompt_error.value = ""

    def save_html(self, path: str | Path) -> Path:
        """Every tab as it is now: the hidden ones catch up first."""
        self.live.scheduler.flush()
        for view in self.views.values():
            view.set_shown(True)
        try:
            return super().save_html(path)
        finally:
            self._tab_changed()
