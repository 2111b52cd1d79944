"""SparseTruncation: the KV view's live controls for DeepSeek-V3.2 / V4 sparse attention, and what they cost.

Design choices:
- V4 has no latent to truncate, but its cache is truncated another way: the lightning indexer keeps `index_topk`
  compressed entries per query (V3.2: keys), CSA / HCA layers read compressed entries and every layer a sliding
  window. The panel turns each of these down through the shared session (`live.update(attention=...)`), so the
  other views show the same run.
- Entries are written per layer, only for the layers each knob has (`controls.attention.applies`): an "all" entry
  cannot carry "index_topk on CSA layers but none where the compressed branch is dropped", which the merged
  per-layer checks would refuse. The panel clears only the keys it wrote, so another view's entries survive.
- A knob at the model's own value (index_topk = config.index_topk, the full window, the branch on) writes nothing:
  the baseline stays the baseline, KL exactly 0.
- "Sweep index_topk" runs `Session.full_run` over a ladder of budgets (nothing else changed; the session is left
  alone), as the latent-rank sweep does.
Shape legend: none (the session's ApplyResult carries the tensors).
"""

from __future__ import annotations

import html
import json

import ipywidgets as widgets

from workbench.config import KIND_NAMES, SLIDING, ModelConfig
from workbench.controls import AttentionControl, ControlError, Controls, LayerKey
from workbench.controls.attention import has_indexer
from workbench.session import ApplyResult
from workbench.widgets.live import LiveSession
from workbench.widgets.svg_charts import line_chart


def indexer_layers(config: ModelConfig) -> tuple[int, ...]:
    return tuple(i for i in range(config.num_hidden_layers) if has_indexer(config, i))


def compressed_kinds(config: ModelConfig) -> tuple[str, ...]:
    """V4's attention kinds that read compressed entries (CSA, HCA), in layer order; () for other models."""
    if not config.is_v4:
        return ()
    kinds = [config.attention_kind(i) for i in range(config.num_hidden_layers)]
    return tuple(dict.fromkeys(k for k in kinds if k != SLIDING))


def topk_ladder(most: int) -> list[int]:
    """1, 2, 4, ... up to and including `most`."""
    out, k = [], 1
    while k < most:
        out.append(k)
        k *= 2
    return [*out, most]


def attention_entries(config: ModelConfig, index_topk: int, sliding_window: int,
                      dropped: frozenset[str]) -> dict[int, AttentionControl]:
    """Per layer, the AttentionControl for a budget, a window and the kinds whose compressed branch is dropped
    (values at the model's own setting are left out; a layer with nothing set has no entry)."""
    out: dict[int, AttentionControl] = {}
    for layer in range(config.num_hidden_layers):
        kind = config.attention_kind(layer) if config.is_v4 else ""
        drop = kind in dropped
        fields: dict[str, object] = {}
        if has_indexer(config, layer) and index_topk < config.index_topk and not drop:
            fields["index_topk"] = index_topk
        if config.is_v4 and sliding_window < config.sliding_window:
            fields["sliding_window"] = sliding_window
        if drop:
            fields["compressed"] = False
        if fields:
            out[layer] = AttentionControl(**fields)  # type: ignore[arg-type]
    return out


class SparseTruncation(widgets.VBox):
    """index_topk slider, V4 window slider and per-kind "drop compressed" toggles, the result line and the sweep."""

    def __init__(self, live: LiveSession) -> None:
        self.live, cfg = live, live.config
        self.indexed = indexer_layers(cfg)
        self.kinds = compressed_kinds(cfg)
        self._owned: set[LayerKey] = set()  # the attention keys this panel wrote
        self._reverting = False
        self.sweep_points: list[tuple[int, float]] = []
        top = max(1, cfg.index_topk)
        self.index_topk = widgets.IntSlider(top, min=1, max=top, description="index_topk", continuous_update=True,
                                            disabled=not self.indexed)
        W = max(1, cfg.sliding_window) if cfg.is_v4 else 1
        self.window = widgets.IntSlider(W, min=1, max=W, description="window", continuous_update=True,
                                        disabled=not cfg.is_v4)
        self.drop = {kind: widgets.Checkbox(False, description=f"drop compressed ({KIND_NAMES.get(kind, kind)})")
                     for kind in self.kinds}
        self.sweep_button = widgets.Button(description="sweep index_topk", disabled=not self.indexed)
        self.result = widgets.HTML()
        self.message = widgets.HTML()
        self.sweep = widgets.HTML()
        knobs: list[widgets.Widget] = [self.index_topk] + ([self.window] if cfg.is_v4 else [])
        layers = ", ".join(map(str, self.indexed)) or "none"
        super().__init__([
            widgets.HTML(f'<div class="wb-kv-sparse-note">sparse attention: the indexer keeps index_topk '
                         f'{"compressed entries" if cfg.is_v4 else "keys"} per query (layers {layers})'
                         + (f"; window {cfg.sliding_window} keys in every layer" if cfg.is_v4 else "") + "</div>"),
            widgets.HBox([*knobs, self.sweep_button]), widgets.HBox(list(self.drop.values())),
            self.message, self.result, self.sweep])
        for w in (self.index_topk, self.window, *self.drop.values()):
            w.observe(lambda _: self._changed(), names="value")
        self.sweep_button.on_click(lambda _: self.run_sweep())
        live.on_result(self.show_result)
        live.on_prompt(self._prompt_changed)
        self.show_result(live.result)

    # ------------------------------------------------------------------ controls
    def entries(self) -> dict[int, AttentionControl]:
        dropped = frozenset(k for k, box in self.drop.items() if box.value)
        return attention_entries(self.live.config, int(self.index_topk.value), int(self.window.value), dropped)

    def set_index_topk(self, k: int) -> None:
        """Move the slider to `k`, refusing what it would silently clamp."""
        self._check("index_topk", k, self.index_topk)
        self.index_topk.value = k

    def set_window(self, w: int) -> None:
        self._check("window", w, self.window)
        self.window.value = w

    def _check(self, name: str, value: int, slider: widgets.IntSlider) -> None:
        if slider.disabled:
            raise ValueError(f"{name}: this {self.live.config.model_type} model has no "
                             f"{'lightning indexer' if name == 'index_topk' else 'sliding window'}")
        if isinstance(value, bool) or not isinstance(value, int) or not slider.min <= value <= slider.max:
            raise ValueError(f"{name}={value!r} must be an int in {slider.min}..{slider.max}")

    def _changed(self) -> None:
        if self._reverting:
            return
        entries = self.entries()
        changes: dict[LayerKey, AttentionControl | None] = dict.fromkeys(self._owned - set(entries))
        changes.update(entries.items())
        try:
            self.live.update(attention=changes)
        except ControlError as e:  # e.g. another view's dense=True on a layer this budget reaches
            self.message.value = f'<div class="wb-error" style="color:#b00">{html.escape(str(e))}</div>'
            self._revert()
            return
        self.message.value = ""
        self._owned = set(entries)

    def _revert(self) -> None:
        """Put the knobs back to what the session runs (the refused change left it as it was)."""
        cfg = self.live.config
        mine = {key: self.live.attention[key] for key in self._owned if key in self.live.attention}
        ks = [ac.index_topk for ac in mine.values() if ac.index_topk is not None]
        ws = [ac.sliding_window for ac in mine.values() if ac.sliding_window is not None]
        self._reverting = True
        try:
            self.index_topk.value = ks[0] if ks else self.index_topk.max
            self.window.value = ws[0] if ws else self.window.max
            for kind, box in self.drop.items():
                box.value = any(ac.compressed is False and cfg.attention_kind(int(layer)) == kind
                                for layer, ac in mine.items())
        finally:
            self._reverting = False

    # ------------------------------------------------------------------ results
    def show_result(self, result: ApplyResult) -> None:
        picks = {layer: float(v) for layer, v in result.selection_change.items()}
        mean_pick = sum(picks.values()) / len(picks) if picks else 0.0
        dloss = float(result.loss_delta.mean())
        before, after = result.top_before[0].text, result.top_after[0].text
        attention = {str(k): v.to_dict() for k, v in result.controls.attention.items()}
        per_layer = " ".join(f'<span class="wb-kv-pick" data-layer="{layer}" data-selection-change="{v:.6g}">'
                             f"L{layer} {100 * v:.1f}%</span>" for layer, v in sorted(picks.items()))
        self.result.value = (
            f'<div class="wb-kv-sparse-result" data-kl="{result.kl:.9g}" data-loss-delta="{dloss:.9g}" '
            f'data-selection-change="{mean_pick:.6g}" data-next-before="{html.escape(before)}" '
            f'data-next-after="{html.escape(after)}" data-generation="{result.generation}" '
            f'data-attention="{html.escape(json.dumps(attention, sort_keys=True))}">'
            f"sparse attention {html.escape(self.describe(result.controls))}: KL(base‖now) {result.kl:.4g} nats · "
            f"mean loss change {dloss:+.4g} nats/token · changed indexer selections {100 * mean_pick:.1f}% "
            f"({per_layer or 'no indexer layer'}) · next token {html.escape(repr(after))} (was "
            f"{html.escape(repr(before))})</div>")

    def describe(self, controls: Controls) -> str:
        cfg = self.live.config
        parts = []
        ks = {ac.index_topk for ac in controls.attention.values() if ac.index_topk is not None}
        parts.append(f"index_topk {'/'.join(map(str, sorted(ks)))} of {cfg.index_topk}" if ks
                     else f"index_topk {cfg.index_topk} (the model's)")
        if cfg.is_v4:
            ws = {ac.sliding_window for ac in controls.attention.values() if ac.sliding_window is not None}
            parts.append(f"window {'/'.join(map(str, sorted(ws)))} of {cfg.sliding_window}" if ws
                         else f"window {cfg.sliding_window}")
            dropped = sorted({KIND_NAMES.get(cfg.attention_kind(int(k)), "") for k, ac in controls.attention.items()
                              if k != "all" and ac.compressed is False})
            if dropped:
                parts.append(f"compressed branch dropped in {'/'.join(dropped)}")
        return ", ".join(parts)

    def _prompt_changed(self) -> None:
        self.sweep_points = []
        self.sweep.value = ""

    def run_sweep(self, ks: list[int] | None = None) -> list[tuple[int, float]]:
        """KL(base‖index_topk k) with every indexer layer at budget k and nothing else changed, each a full run
        that leaves the session as it is."""
        cfg = self.live.config
        if not self.indexed:
            raise ValueError(f"this {cfg.model_type} model has no lightning indexer: no index_topk to sweep")
        ks = topk_ladder(cfg.index_topk) if ks is None else ks
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.index_topk]
        if bad:
            raise ValueError(f"index_topk values {bad} are outside 1..index_topk={cfg.index_topk}")
        points = []
        with self.live.lock:
            for k in ks:
                points.append((k, self.live.session.full_run(Controls.index_topk(k, layers=self.indexed)).kl))
        self.sweep_points = points
        self.sweep.value = ('<div class="wb-kv-topk-sweep">KL(base‖index_topk k), every indexer layer at k<br>'
                            + line_chart({"KL": points}, xlabel="index_topk k", ylabel="KL (nats)", log_y=True,
                                         cls="wb-kv-topk-sweep-chart") + "</div>")
        return points
