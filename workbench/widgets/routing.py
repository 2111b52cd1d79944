"""RoutingExplorer: which experts each token chose in every MoE layer, for a stored trace or the live prompt.

The grid is an anywidget whose ESM (static/routing_grid.js) draws a page of tokens on a canvas: cells coloured (and,
when wide enough, numbered) by top-1 expert, token texts along the x axis, a legend of experts; hover shows a token's
top-k experts and weights in every layer, click selects it (`selected`, a global token index). Only a page
and the per-layer loads travel to the browser (see routing_page.py), so a 100k-token store pages instead of
freezing the tab. With the live source, every change the tuner makes redraws the grid. DeepSeek-V4's hash-routed
layers (from the live config, or a trace's `hash_routed` coordinate) are marked: "#" before the row label, a dashed
border, and a tooltip saying the experts are tid2eid[token id].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as widgets
import numpy as np
import traitlets
import xarray as xr

from workbench.widgets.frontend import esm_source
from workbench.widgets.live import LiveSession
from workbench.widgets.routing_page import (
    DEFAULT_PAGE_TOKENS,
    load_per_layer,
    n_pages,
    routing_page,
    token_choices,
)
from workbench.widgets.view import ModelArg, View, heading, resolve_sources


class RoutingGrid(anywidget.AnyWidget):
    """The canvas grid (static/routing_grid.js): `data` is one page (routing_page), `selected` a token index."""

    esm_name = "routing_grid"
    _esm = esm_source("routing_grid", "anywidget")
    data = traitlets.Dict().tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)

    @traitlets.validate("selected")
    def _check_selected(self, proposal: traitlets.Bunch) -> int:
        """A token of the source or -1 (none): an index past the source would only fail later, in selected_choices."""
        value, n = proposal["value"], int(self.data.get("n_total", 0))
        if isinstance(value, bool) or not -1 <= value < n:
            raise ValueError(f"selected token {value!r} is outside 0..{n - 1} (-1: none) of this {n}-token source")
        return int(value)


class RoutingExplorer(View):
    """Tokens x MoE layers coloured by chosen expert; switch between `sources` ("live" and/or "trace").

    Args:
        model, prompt: build a live session of their own (ignored when `live` is given).
        trace: a trace store path or Dataset to explore (checked against the live model when there is one).
        live: a shared LiveSession (the dashboard's); None with no trace builds one on `model`.
        page_tokens: tokens per page sent to the browser.
    """

    title = "routing explorer"

    def __init__(self, model: ModelArg | None = None, *, trace: str | Path | xr.Dataset | None = None,
                 prompt: str | None = None, live: LiveSession | None = None,
                 page_tokens: int = DEFAULT_PAGE_TOKENS) -> None:
        if isinstance(page_tokens, bool) or not isinstance(page_tokens, int) or page_tokens < 1:
            raise ValueError(f"page_tokens must be an int >= 1, got {page_tokens!r}")
        self.page_tokens = page_tokens
        self.live: LiveSession | None
        self.traces: dict[str, xr.Dataset]
        self.live, self.traces = resolve_sources(model, trace, prompt, live)
        self._loads: dict[str, np.ndarray] = {}
        names = (["live"] if self.live is not None else []) + list(self.traces)
        # a stored trace, when given, is what the user came to see; "live" is one click away
        self.source_picker = widgets.ToggleButtons(options=names, value=names[-1], description="source")
        self.page_slider = widgets.IntSlider(0, min=0, max=0, description="page", continuous_update=False)
        self.grid = RoutingGrid()
        self.status = widgets.HTML()
        super().__init__([heading("Routing explorer", "tokens x MoE layers, coloured by chosen expert; "
                                  "hover or click a token"), widgets.HBox([self.source_picker, self.page_slider]),
                          self.status, self.grid])
        self.source_picker.observe(lambda _: self._source_changed(), names="value")
        self.page_slider.observe(lambda _: self.refresh(), names="value")
        if self.live is not None:
            self.live.on_result(self.when_shown(self._live_changed))
            self.live.on_prompt(self.when_shown(self._live_changed))
        self._source_changed()

    # ------------------------------------------------------------------ data
    @property
    def source(self) -> str:
        return str(self.source_picker.value)

    def dataset(self, source: str | None = None) -> xr.Dataset:
        """The routing Dataset behind `source` (default: the one shown)."""
        name = source or self.source
        if name == "live":
            assert self.live is not None
            return self.live.routing_trace()
        if name not in self.traces:
            raise ValueError(f"unknown source {name!r}; this explorer has {list(self.source_picker.options)}")
        return self.traces[name]

    def hash_layers(self, source: str | None = None) -> list[int] | None:
        """The live model's hash-routed MoE layers for the live source; None (the trace says) for a stored one."""
        if (source or self.source) != "live":
            return None
        assert self.live is not None
        cfg = self.live.config
        return [layer for layer in cfg.moe_layers if cfg.is_hash_layer(layer)]

    def _load(self, name: str, ds: xr.Dataset) -> np.ndarray:
        if name == "live":  # changes with every control; the prompt is small
            return load_per_layer(ds)
        if name not in self._loads:
            self._loads[name] = load_per_layer(ds)
        return self._loads[name]

    def selected_choices(self) -> list[dict[str, Any]]:
        """Top-k experts and weights per MoE layer of the selected token (empty when none is selected)."""
        if self.grid.selected < 0:
            return []
        return token_choices(self.dataset(), self.grid.selected)

    # ------------------------------------------------------------------ updates
    def show_page(self, page: int) -> None:
        """Show page `page`, a whole number in 0..pages-1 (1.5 is refused, not rounded: the slider would floor it)."""
        pages = self.page_slider.max + 1
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)) or not 0 <= page < pages:
            raise ValueError(f"page {page!r} is outside 0..{pages - 1} (a whole page number)")
        self.page_slider.value = int(page)

    def set_source(self, name: str) -> None:
        if name not in self.source_picker.options:
            raise ValueError(f"unknown source {name!r}; this explorer has {list(self.source_picker.options)}")
        self.source_picker.value = name

    def _source_changed(self) -> None:
        ds = self.dataset()
        pages = n_pages(int(ds.sizes["token"]), self.page_tokens)
        with self.page_slider.hold_trait_notifications():
            self.page_slider.value = min(self.page_slider.value, pages - 1)
            self.page_slider.max = pages - 1
        self.grid.selected = -1
        self.refresh()

    def _live_changed(self) -> None:
        if self.source == "live":
            self._source_changed()

    def refresh(self) -> None:
        name = self.source
        ds = self.dataset(name)
        page = min(int(self.page_slider.value), n_pages(int(ds.sizes["token"]), self.page_tokens) - 1)
        self.grid.data = routing_page(ds, page, page_tokens=self.page_tokens, load=self._load(name, ds), source=name,
                                      hash_layers=self.hash_layers(name))
        complete = ds.attrs.get("complete", True)
        self.status.value = ("" if complete else '<span style="color:#a60">this store is incomplete (an interrupted '
                             "run): it shows every committed token</span>")
