"""SparseAttention: what each query of the live prompt reads in a DeepSeek-V3.2 or V4 attention layer.

For the query under the cursor: the sliding-window tokens, the compressed entries (bars over the tokens each pools)
and which of them the lightning indexer chose, coloured by index score, and V4's attention mass on window /
compressed / sink per head. The map is an anywidget (static/sparse_attention.js) carrying every layer of the prompt,
so layer buttons and hovering work with no kernel (a static export, `workbench serve`); the Python layer picker and
query slider move the same `layer` / `query` traits. The data comes from the model's probes
(sparse_attention_data.py) under the shared session's controls, so an index_topk or window change made elsewhere
redraws it. V2 / V3 run dense MLA: the view says so instead.
"""

from __future__ import annotations

import html
from typing import Any

import anywidget
import ipywidgets as widgets
import traitlets

from workbench.widgets.frontend import esm_source
from workbench.widgets.live import LiveSession
from workbench.widgets.sparse_attention_data import (
    DEFAULT_MAX_TOKENS,
    attention_reads,
    dense_message,
    is_sparse,
)
from workbench.widgets.view import ModelArg, View, heading, resolve_live

__all__ = ["SparseAttention", "SparseAttentionMap", "attention_reads"]


class SparseAttentionMap(anywidget.AnyWidget):
    """The map (static/sparse_attention.js): `data` from attention_reads, `query` a token (-1: the last), `layer`
    an attention layer (-1: the first that selects)."""

    esm_name = "sparse_attention"
    _esm = esm_source("sparse_attention", "anywidget")
    data = traitlets.Dict().tag(sync=True)
    query = traitlets.Int(-1).tag(sync=True)
    layer = traitlets.Int(-1).tag(sync=True)

    @traitlets.validate("query")
    def _check_query(self, proposal: traitlets.Bunch) -> int:
        value, n = proposal["value"], int(self.data.get("n", 0))
        if isinstance(value, bool) or not -1 <= value < max(n, 0):
            raise ValueError(f"query token {value!r} is outside 0..{n - 1} (-1: the last) of the {n} tokens shown")
        return int(value)

    @traitlets.validate("layer")
    def _check_layer(self, proposal: traitlets.Bunch) -> int:
        value, layers = proposal["value"], [L["layer"] for L in self.data.get("layers", [])]
        if isinstance(value, bool) or (value != -1 and value not in layers):
            raise ValueError(f"layer {value!r} is not an attention layer of this model ({layers}; -1: default)")
        return int(value)


class SparseAttention(View):
    """The view. `model`, `prompt`: a live session of its own (ignored with `live`, the dashboard's session);
    `max_tokens`: at most this many prompt tokens are shown (the data grows with tokens x index_topk)."""

    title = "sparse attention"

    def __init__(self, model: ModelArg | None = None, *, prompt: str | None = None, live: LiveSession | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.live = resolve_live(model, prompt, live)
        self.max_tokens = max_tokens
        cfg = self.live.config
        self.sparse = is_sparse(cfg)
        self.map = SparseAttentionMap()
        self.status = widgets.HTML()
        head = heading("Sparse attention", "what each query reads: window, compressed entries, indexer picks; "
                       "hover or click a token")
        self.layer_picker = widgets.Dropdown(options=[0], value=0, description="layer", disabled=not self.sparse)
        self.query_slider = widgets.IntSlider(0, min=0, max=0, description="query", disabled=not self.sparse)
        if not self.sparse:  # nothing to pick: only the message is shown
            self.status.value = (f'<div class="wb-sa-dense" style="padding:6px;background:#f6f6f6">'
                                 f"{html.escape(dense_message(self.live.loaded.name, cfg))}</div>")
            super().__init__([head, self.status])
            return
        super().__init__([head, widgets.HBox([self.layer_picker, self.query_slider]), self.status, self.map])
        self._reset_query = True
        self.refresh()
        self.layer_picker.observe(lambda ch: self._set_map("layer", ch["new"]), names="value")
        self.query_slider.observe(lambda ch: self._set_map("query", ch["new"]), names="value")
        self.map.observe(lambda ch: self._map_moved(), names=["layer", "query"])
        self.live.on_result(self.when_shown(self.refresh))
        self.live.on_prompt(self.when_shown(self._prompt_changed))

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> dict[str, Any]:
        return dict(self.map.data)

    def reads(self, layer: int | None = None, query: int | None = None) -> dict[str, Any]:
        """What `query` (default: the selected one) reads in attention layer `layer` (default: the one shown), as
        the map draws it: window [lo, hi] or None, visible entries, chosen entries (best first) with scores and
        token spans, and (V4) the mass [window, compressed, sink] per head and its mean over heads."""
        if not self.sparse:
            raise ValueError(dense_message(self.live.loaded.name, self.live.config))
        d = self.map.data
        layer = self.shown_layer() if layer is None else layer
        rec = next((L for L in d["layers"] if L["layer"] == layer), None)
        if rec is None:
            raise ValueError(f"layer {layer!r} is not an attention layer of this model")
        t = self.shown_query() if query is None else query
        if not 0 <= t < d["n"]:
            raise ValueError(f"query {t} is outside 0..{d['n'] - 1}")
        window = [max(0, t - rec["window"] + 1), t] if rec["window"] > 0 else None
        if not rec["compressed"]:
            visible = 0
        elif rec["kind"] == "V3.2 sparse":
            visible = t + 1
        else:
            visible = min(rec["n_entries"], (t + 1) // rec["ratio"])
        chosen = list(range(visible)) if rec["reads_all"] else list(rec["selected"][t]) if rec["selected"] else []
        scores = list(rec["scores"][t]) if rec["scores"] and not rec["reads_all"] else []
        out: dict[str, Any] = {"layer": layer, "query": t, "kind": rec["kind"], "window": window, "visible": visible,
                               "chosen": chosen, "scores": scores, "spans": [rec["spans"][w] for w in chosen]}
        if rec["mass"] is not None:
            H = d["heads"]
            per_head = [rec["mass"][(t * H + h) * 3:(t * H + h) * 3 + 3] for h in range(H)]
            out["mass_per_head"] = per_head
            out["mass_mean"] = [sum(v[b] for v in per_head) / H for b in range(3)]
        return out

    def shown_layer(self) -> int:
        layers = self.map.data["layers"]
        if self.map.layer != -1:
            return int(self.map.layer)
        return int(next((L["layer"] for L in layers if L["selected"]), layers[0]["layer"]))

    def shown_query(self) -> int:
        return int(self.map.query) if self.map.query >= 0 else int(self.map.data["n"]) - 1

    # ------------------------------------------------------------------ updates
    def refresh(self) -> None:
        """Capture the prompt again under the session's current controls and redraw."""
        if not self.sparse:
            return
        d = attention_reads(self.live, max_tokens=self.max_tokens)
        n = int(d["n"])
        query = n - 1 if self._reset_query or self.map.query >= n else int(self.map.query)
        self._reset_query = False
        with self.map.hold_trait_notifications():
            self.map.data = d
            self.map.query = query
        layers = [(f"L{L['layer']} {L['kind']}", L["layer"]) for L in d["layers"]]
        if list(self.layer_picker.options) != layers:
            self.layer_picker.options = layers
        self.layer_picker.value = self.shown_layer()
        with self.query_slider.hold_trait_notifications():
            self.query_slider.max = max(n - 1, 0)
            self.query_slider.value = query
        self.status.value = self._status(d)

    def _status(self, d: dict[str, Any]) -> str:
        kinds = ", ".join(f"L{L['layer']} {L['kind']}" for L in d["layers"])
        cfg = self.live.config
        parts = [f"{d['model']}: {d['n']} query tokens · {kinds}"]
        if cfg.is_v4:
            parts.append(f"sliding_window {cfg.sliding_window}")
        parts.append(f"index_topk {cfg.index_topk}")
        controls = {L["layer"]: L["control"] for L in d["layers"] if L["control"]}
        if controls:
            parts.append("controls: " + "; ".join(f"L{layer} " + ", ".join(f"{k}={v}" for k, v in c.items())
                                                  for layer, c in controls.items()))
        cap = (f'<div class="wb-sa-capped" style="color:#a60">showing the first {d["n"]} of the prompt\'s '
               f'{d["n_prompt"]} tokens (max_tokens={self.max_tokens} and the payload budget)</div>'
               if d["capped"] else "")
        return (f'<div class="wb-sa-status" data-tokens="{d["n"]}" data-prompt-tokens="{d["n_prompt"]}">'
                + html.escape(" · ".join(parts)) + f"</div>{cap}")

    def _set_map(self, name: str, value: int) -> None:
        if getattr(self.map, name) != value:
            setattr(self.map, name, value)

    def _map_moved(self) -> None:
        """The map's layer / query changed (a click in the browser): the Python controls follow."""
        layer, query = self.shown_layer(), self.shown_query()
        if self.layer_picker.value != layer:
            self.layer_picker.value = layer
        if self.query_slider.value != query:
            self.query_slider.value = query

    def _prompt_changed(self) -> None:
        self._reset_query = True  # the result listener that follows recaptures
