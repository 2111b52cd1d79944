"""Workbench: the views on one live session (one model, one prompt, one set of controls) as tabs.

The tuner and the KV view write controls into the shared session; the routing explorer and the specialisation view
follow it when their source is "live"; the FP8 view compares on the same prompt; the sparse-attention view recaptures
what each query reads and the mHC view the stream-mixing matrices after every change. `set_prompt` swaps the prompt
for all of them at once. A new view is one more (title, factory) pair in `_factories`.

Each tab is built when it is first shown (or read: `wb.fp8`, `views`, `save_html`), not with the dashboard: the
FP8 comparison, the sparse-attention capture and the mHC matrices cost seconds a user waiting for the first
routing picture need not pay. A view built later starts from the live session's current state, which is what a
hidden tab catching up would show.
"""

from __future__ import annotations

from collections.abc import Callable
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
        self.tuner = LiveTuner(live=self.live)  # built now (cheap): its report is the first listener a result reaches
        live = self.live
        # tab title -> how to build its view, in tab order
        self._factories: dict[str, Callable[[], View]] = {
            "Routing": lambda: RoutingExplorer(trace=ds, live=live, page_tokens=page_tokens),
            "Specialisation": lambda: ExpertSpecialisation(trace=ds, live=live),
            "KV compression": lambda: KVCompression(trace=ds, live=live),
            "FP8 error": lambda: FP8Error(trace=ds, live=live),
            "Live tuner": lambda: self.tuner,
            "Sparse attention": lambda: SparseAttention(live=live),
            "mHC": lambda: HyperConnections(live=live)}
        self._built: dict[str, View] = {"Live tuner": self.tuner}
        self._switching = False
        self.prompt_box = widgets.Textarea(self.live.prompt, description="prompt", rows=2,
                                           layout=widgets.Layout(width="70%"))
        self.prompt_button = widgets.Button(description="run prompt")
        self.prompt_error = widgets.HTML()
        self.tabs = widgets.Tab(children=[self._built.get(t) or _placeholder(t) for t in self._factories],
                                titles=list(self._factories))
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

    # ------------------------------------------------------------------ the tabs' views, built on first use
    def view(self, title: str) -> View:
        """The view of tab `title`, built now if it has not been (its tab then shows it)."""
        if title not in self._built:
            view = self._built[title] = self._factories[title]()
            view.set_shown(False)  # until _tab_changed says otherwise
            index = list(self._factories).index(title)
            children = list(self.tabs.children)
            children[index] = view
            selected, self._switching = self.tabs.selected_index, True
            try:
                self.tabs.children = children
                self.tabs.selected_index = selected
            finally:
                self._switching = False
        return self._built[title]

    @property
    def views(self) -> dict[str, View]:
        """Every tab's view (building the ones not yet shown), in tab order."""
        return self.build_all()

    def build_all(self) -> dict[str, View]:
        """Build every tab not built yet (an export, a static mirror); the views in tab order."""
        return {title: self.view(title) for title in self._factories}

    routing = property(lambda self: self.view("Routing"))
    specialisation = property(lambda self: self.view("Specialisation"))
    kv = property(lambda self: self.view("KV compression"))
    fp8 = property(lambda self: self.view("FP8 error"))
    sparse_attention = property(lambda self: self.view("Sparse attention"))
    hyper_connections = property(lambda self: self.view("mHC"))

    def _tab_changed(self) -> None:
        """Only the selected tab refreshes on every live change; the others catch up when they are selected. The
        selected tab is built if it has not been."""
        if self._switching:
            return
        titles = list(self._factories)
        selected = self.tabs.selected_index or 0
        self.view(titles[selected])
        for title, view in self._built.items():
            view.set_shown(title == titles[selected])

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
        for view in self.views.values():  # builds the tabs never shown
            view.set_shown(True)
        try:
            return super().save_html(path)
        finally:
            self._tab_changed()


def _placeholder(title: str) -> widgets.HTML:
    """What an unbuilt tab holds until it is first selected (then its view replaces it)."""
    return widgets.HTML(f'<div class="wb-tab-pending" style="color:#666;padding:8px">{title}: building…</div>')

