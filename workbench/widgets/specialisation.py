"""ExpertSpecialisation: pick a MoE layer and an expert and see what it is for: the tokens it prefers (lift over the
base rate, from `analysis.top_tokens_per_expert`), where it fires in context, and which experts fire with it
(`analysis.coactivation`). Whole-trace analyses are computed once per source and cached; picking another expert
only slices them."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr

from workbench import analysis
from workbench.analysis import n_experts
from workbench.widgets.live import LiveSession
from workbench.widgets.specialisation_data import (
    check_layer_expert,
    coactivation_partners,
    examples_in_context,
    preferred_tokens,
)
from workbench.widgets.view import ModelArg, View, heading, resolve_sources

TABLE_STYLE = "border-collapse:collapse;margin:4px 16px 8px 0;font-size:12px"


def _table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f'<th style="text-align:left;padding:1px 8px">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="padding:1px 8px">{c}</td>' for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}" style="{TABLE_STYLE}"><tr>{head}</tr>{body}</table>'


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


class ExpertSpecialisation(View):
    """Preferred tokens, examples in context and co-activation partners of one (layer, expert)."""

    title = "expert specialisation"

    def __init__(self, model: ModelArg | None = None, *, trace: str | Path | xr.Dataset | None = None,
                 prompt: str | None = None, live: LiveSession | None = None, layer: int | None = None,
                 expert: int | None = None, top_n: int = 10, min_count: int | None = None) -> None:
        self.live: LiveSession | None
        self.traces: dict[str, xr.Dataset]
        self.live, self.traces = resolve_sources(model, trace, prompt, live)
        self.top_n = top_n
        self._cache: dict[tuple[str, str, int], Any] = {}
        names = (["live"] if self.live is not None else []) + list(self.traces)
        first = self._dataset(names[-1])  # a stored trace, when given, is the interesting default
        layers = [int(x) for x in first["layer"].values]
        E = n_experts(first)
        layer = layers[0] if layer is None else layer
        check_layer_expert(first, layer, 0 if expert is None else expert, E)
        if expert is None:  # start on the layer's busiest expert: it has tokens, examples and partners to show
            expert = int(np.asarray(analysis.expert_load(first).sel(layer=layer).values).argmax())
        self.source_picker = widgets.ToggleButtons(options=names, value=names[-1], description="source")
        self.layer_picker = widgets.Dropdown(options=layers, value=layer, description="layer")
        self.expert_picker = widgets.Dropdown(options=list(range(E)), value=expert, description="expert")
        default_min = (1 if names[-1] == "live" else 5) if min_count is None else min_count
        self.min_count = widgets.BoundedIntText(default_min, min=1, max=10**9, description="min count")
        self.report = widgets.HTML()
        super().__init__([heading("Expert specialisation", "what one expert prefers, in context, and its partners"),
                          widgets.HBox([self.source_picker, self.layer_picker, self.expert_picker, self.min_count]),
                          self.report])
        for w in (self.source_picker, self.layer_picker, self.expert_picker, self.min_count):
            w.observe(lambda _: self.refresh(), names="value")
        if self.live is not None:
            self.live.on_result(self.when_shown(self._live_changed))
            self.live.on_prompt(self.when_shown(self._live_changed))
        self.refresh()

    # ------------------------------------------------------------------ data
    @property
    def source(self) -> str:
        return str(self.source_picker.value)

    def _dataset(self, name: str) -> xr.Dataset:
        if name == "live":
            assert self.live is not None
            return self.live.routing_trace()
        return self.traces[name]

    def _cached(self, kind: str, name: str, min_count: int, compute: Any) -> Any:
        key = (kind, name, min_count)
        if name == "live":  # follows the controls; recomputed, it is one prompt
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _token_text(self, ds: xr.Dataset, token_id: int) -> str:
        if self.live is not None:
            return self.live.tokenizer.token_text(token_id)
        hits = np.nonzero(np.asarray(ds["token_id"].values) == token_id)[0]
        return str(ds["text"].values[hits[0]]) if len(hits) else f"<{token_id}>"

    def summary(self, layer: int, expert: int) -> dict[str, Any]:
        """Everything the view shows for (layer, expert) on the current source, as plain data."""
        name, min_count = self.source, int(self.min_count.value)
        ds = self._dataset(name)
        check_layer_expert(ds, layer, expert, n_experts(ds))
        top = self._cached("top", name, min_count,
                           lambda: analysis.top_tokens_per_expert(ds, n=self.top_n, min_count=min_count))
        coact = self._cached("coact", name, 0, lambda: analysis.coactivation(ds).compute())
        load = np.asarray(coact["count"].sel(layer=layer).values).diagonal()  # [E] choices per expert
        return {"layer": layer, "expert": expert, "tokens": int(ds.sizes["token"]),
                "load": int(load[expert]), "load_share": float(load[expert] / max(load.sum(), 1)),
                "preferred": preferred_tokens(top, layer, expert, lambda t: self._token_text(ds, t)),
                "examples": examples_in_context(ds, layer, expert),
                "partners": coactivation_partners(coact, layer, expert)}

    # ------------------------------------------------------------------ updates
    def select(self, layer: int, expert: int) -> None:
        """Show (layer, expert); ValueError naming the bad one, with the view unchanged."""
        ds = self._dataset(self.source)
        check_layer_expert(ds, layer, expert, n_experts(ds))
        with self.hold_trait_notifications():
            self.layer_picker.value, self.expert_picker.value = layer, expert

    def _live_changed(self) -> None:
        if self.source == "live":
            self.refresh()

    def refresh(self) -> None:
        s = self.summary(int(self.layer_picker.value), int(self.expert_picker.value))
        esc = html.escape
        pref = _table(["token", "lift", "count"], [[f"<code>{esc(repr(p['text']))}</code>", _fmt(p["lift"]),
                                                    str(p["count"])] for p in s["preferred"]], "wb-spec-preferred")
        if not s["preferred"]:
            pref = f"<i>no token reaches min count {int(self.min_count.value)} with this expert</i>"
        ex_rows = [[f"{e['token']}", f"<code>{esc(e['before'])}<b style='background:#fd6'>{esc(e['text'])}</b>"
                    f"{esc(e['after'])}</code>", f"#{e['slot'] + 1}", _fmt(e["weight"], 3)] for e in s["examples"]]
        examples = (_table(["token", "in context", "slot", "weight"], ex_rows, "wb-spec-examples") if ex_rows
                    else "<i>this expert was never chosen in this layer</i>")
        partners = _table(["partner", "together", "lift"], [[f"e{p['expert']}", str(p["count"]), _fmt(p["lift"])]
                                                            for p in s["partners"]], "wb-spec-partners")
        self.report.value = (
            f'<div class="wb-spec" data-layer="{s["layer"]}" data-expert="{s["expert"]}">'
            f"<p>layer {s['layer']}, expert {s['expert']}: chosen {s['load']} times in {s['tokens']} tokens "
            f"({100 * s['load_share']:.1f}% of this layer's choices)</p>"
            f'<div style="display:flex;flex-wrap:wrap;gap:8px"><div><b>preferred tokens</b> (lift = P(expert | token) '
            f"/ P(expert)){pref}</div><div><b>co-activation partners</b>{partners}</div></div>"
            f"<div><b>examples in context</b>{examples}</div></div>")
