"""LiveTuner: every routing and latent control of `workbench.controls` as a widget, applied to the shared live
session as you move it (latest-wins, scheduled by the session), with the session's report beside it.

A widget left at the model's own value means "not set" (None in the control), so a fresh tuner is the baseline and
only what you touched is sent. `scope` picks which controls you edit: "all" MoE layers, or one layer, whose own
entry overrides "all" field by field. An impossible combination shows the ControlError and the session keeps its
last valid state.
Shape legend: S prompt tokens, L MoE layers.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from workbench.controls import ControlError, LatentControl, LayerKey, RoutingControl
from workbench.session import ApplyResult
from workbench.widgets.live import LiveSession
from workbench.widgets.svg_charts import bars
from workbench.widgets.view import ModelArg, View, heading, resolve_live

_TABLE = 'style="border-collapse:collapse;font-size:12px;margin:2px 12px 6px 0"'


def parse_bias_offsets(text: str, n_experts: int) -> dict[int, float] | None:
    """"3:+0.5, 7:-1" -> {3: 0.5, 7: -1.0}; empty -> None; ControlError naming the bad entry."""
    text = text.strip()
    if not text:
        return None
    out: dict[int, float] = {}
    for part in (p.strip() for p in text.split(",")):
        expert, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            e, v = int(expert), float(value)
        except ValueError:
            raise ControlError(f"bias offsets: {part!r} is not 'expert:offset' (e.g. '3:+0.5, 7:-1')") from None
        if not 0 <= e < n_experts:
            raise ControlError(f"bias offsets: expert {e} is outside 0..{n_experts - 1}")
        if not math.isfinite(v):
            raise ControlError(f"bias offsets: the offset of expert {e} must be finite, got {value.strip()!r}")
        out[e] = v
    return out


class LiveTuner(View):
    """Routing / latent controls as widgets on the shared session; see the module docstring."""

    title = "live tuner"

    def __init__(self, model: ModelArg | None = None, *, prompt: str | None = None,
                 live: LiveSession | None = None) -> None:
        self.live = resolve_live(model, prompt, live)
        cfg = self.live.config
        self.defaults = {"top_k": cfg.num_experts_per_tok, "topk_group": cfg.topk_group,
                         "routed_scaling_factor": float(cfg.routed_scaling_factor), "temperature": 1.0,
                         "shared_experts": True}
        E = cfg.n_routed_experts
        self._loading = False
        self.scope = widgets.Dropdown(options=["all", *cfg.moe_layers], value="all", description="scope")
        self.top_k = widgets.IntSlider(cfg.num_experts_per_tok, min=1, max=E, description="top-k")
        self.topk_group = widgets.IntSlider(cfg.topk_group, min=1, max=max(cfg.n_group, 1), description="topk_group",
                                            disabled=cfg.n_group <= 1)
        self.scaling = widgets.FloatSlider(float(cfg.routed_scaling_factor), min=0.0,
                                           max=max(4.0, 2 * float(cfg.routed_scaling_factor)), step=0.05,
                                           description="scaling")
        self.norm_topk_prob = widgets.Dropdown(options={f"model ({cfg.norm_topk_prob})": "model", "on": "on",
                                                        "off": "off"}, value="model", description="norm_topk")
        self.shared = widgets.Checkbox(True, description="shared experts", disabled=cfg.n_shared_experts == 0)
        self.temperature = widgets.FloatLogSlider(1.0, base=10, min=-1, max=1, step=0.05, description="temperature")
        self.ablate = widgets.SelectMultiple(options=list(range(E)), value=(), description="ablate", rows=4)
        self.force = widgets.SelectMultiple(options=list(range(E)), value=(), description="force", rows=4)
        self.bias = widgets.Text("", description="bias offsets", placeholder="3:+0.5, 7:-1", continuous_update=False)
        self.latent_rank = widgets.IntSlider(cfg.kv_lora_rank, min=1, max=cfg.kv_lora_rank, description="latent rank")
        self.reset_button = widgets.Button(description="reset all")
        self.error = widgets.HTML()
        self.report = widgets.HTML()
        self.routing_widgets = [self.top_k, self.topk_group, self.scaling, self.norm_topk_prob, self.shared,
                                self.temperature, self.ablate, self.force, self.bias]
        controls = widgets.VBox([self.scope, self.top_k, self.topk_group, self.scaling, self.norm_topk_prob,
                                 self.shared, self.temperature, widgets.HBox([self.ablate, self.force]), self.bias,
                                 self.latent_rank, self.reset_button])
        super().__init__([heading("Live tuner", "routing and latent controls on the live prompt"),
                          widgets.HBox([controls, widgets.VBox([self.error, self.report])])])
        for w in self.routing_widgets:
            w.observe(lambda _: self._routing_changed(), names="value")
        self.latent_rank.observe(lambda _: self._latent_changed(), names="value")
        self.scope.observe(lambda _: self._load_scope(), names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self.live.on_result(self._show_result)
        self.live.on_continuation(self._show_result)  # the same report, its continuation filled in
        self.live.on_error(self._show_error)
        self._show_result(self.live.result)

    # ------------------------------------------------------------------ widgets -> controls
    def routing_control(self) -> RoutingControl | None:
        """The control the widgets describe for the current scope (None: nothing differs from the model)."""
        E = self.live.config.n_routed_experts
        d = self.defaults
        fields: dict[str, Any] = {
            "top_k": self.top_k.value if self.top_k.value != d["top_k"] else None,
            "topk_group": self.topk_group.value if self.topk_group.value != d["topk_group"] else None,
            "routed_scaling_factor": (self.scaling.value if not math.isclose(self.scaling.value,
                                                                             d["routed_scaling_factor"]) else None),
            "norm_topk_prob": {"model": None, "on": True, "off": False}[self.norm_topk_prob.value],
            "shared_experts": None if self.shared.value else False,
            "temperature": self.temperature.value if not math.isclose(self.temperature.value, 1.0) else None,
            "ablate": tuple(self.ablate.value) or None,
            "force": tuple(self.force.value) or None,
            "bias_offset": parse_bias_offsets(self.bias.value, E),
        }
        if all(v is None for v in fields.values()):
            return None
        return RoutingControl(**fields)

    def _routing_changed(self) -> None:
        if self._loading:
            return
        try:
            rc = self.routing_control()
            key: LayerKey = self.scope.value
            self.live.update(routing={key: rc})
        except ControlError as e:
            self._show_error(str(e))
            return
        self.error.value = ""

    def _latent_changed(self) -> None:
        if self._loading:
            return
        r = int(self.latent_rank.value)
        lc = None if r >= self.live.config.kv_lora_rank else LatentControl(r)
        try:
            self.live.update(latent={"all": lc})
        except ControlError as e:
            self._show_error(str(e))
            return
        self.error.value = ""

    def _load_scope(self) -> None:
        """Show the stored control of the newly chosen scope in the widgets, without re-running anything."""
        rc = self.live.routing.get(self.scope.value) or RoutingControl()
        d = self.defaults
        self._loading = True
        try:
            self.top_k.value = rc.top_k if rc.top_k is not None else d["top_k"]
            self.topk_group.value = rc.topk_group if rc.topk_group is not None else d["topk_group"]
            self.scaling.value = (rc.routed_scaling_factor if rc.routed_scaling_factor is not None
                                  else d["routed_scaling_factor"])
            self.norm_topk_prob.value = {None: "model", True: "on", False: "off"}[rc.norm_topk_prob]
            self.shared.value = rc.shared_experts is not False
            self.temperature.value = rc.temperature if rc.temperature is not None else 1.0
            self.ablate.value = tuple(rc.ablate or ())
            self.force.value = tuple(rc.force or ())
            self.bias.value = ", ".join(f"{e}:{v:+g}" for e, v in (rc.bias_offset or {}).items())
        finally:
            self._loading = False

    def reset(self) -> None:
        """Every control back to the model's own (the baseline run)."""
        cleared: dict[LayerKey, RoutingControl | None] = dict.fromkeys(self.live.routing)
        self.live.update(routing=cleared, latent=dict.fromkeys(self.live.latent))
        self._load_scope()
        self._loading = True
        try:
            self.latent_rank.value = self.live.config.kv_lora_rank
        finally:
            self._loading = False
        self.error.value = ""

    # ------------------------------------------------------------------ session -> report
    def _show_error(self, message: str) -> None:
        self.error.value = (f'<div class="wb-error" style="color:#b00;max-width:520px">{html.escape(message)}<br>'
                            "<small>the session keeps its last valid controls</small></div>")

    def _show_result(self, result: ApplyResult) -> None:
        lc = result.controls.latent_for(self.live.config.num_hidden_layers - 1)
        self._loading = True
        try:  # another view (KV compression) may have moved the latent rank
            self.latent_rank.value = lc.rank if lc is not None else self.live.config.kv_lora_rank
        finally:
            self._loading = False
        esc = html.escape
        tops = "".join(f"<tr><td><code>{esc(repr(b.text))}</code> {b.prob:.3f}</td>"
                       f"<td><code>{esc(repr(a.text))}</code> {a.prob:.3f}</td></tr>"
                       for b, a in zip(result.top_before, result.top_after, strict=True))
        change = "".join(f'<tr class="wb-tuner-change" data-layer="{layer}" data-value="{f:.6g}"><td>layer {layer}'
                         f"</td><td>{100 * f:.1f}%</td></tr>" for layer, f in result.expert_change.items())
        dloss = result.loss_delta.tolist()
        text = [self.live.tokenizer.token_text(int(t)) for t in self.live.input_ids[0, 1:].tolist()]
        self.report.value = (
            f'<div class="wb-tuner-report" data-generation="{result.generation}" data-kl="{result.kl:.6g}" '
            f'data-elapsed-ms="{result.elapsed_ms:.1f}" data-controls="{esc(result.controls.to_json())}">'
            f"<p><b>KL(base‖now)</b> {result.kl:.4g} nats · mean loss change "
            f"{sum(dloss) / max(len(dloss), 1):+.4g} nats/token · re-ran from layer {result.start_layer} in "
            f"{result.elapsed_ms:.0f} ms</p>"
            f'<div style="display:flex;gap:12px"><table class="wb-tuner-top" {_TABLE}><tr><th>before</th><th>after</th>'
            f"</tr>{tops}</table><table class=\"wb-tuner-changes\" {_TABLE}><tr><th>MoE layer</th><th>experts changed"
            f"</th></tr>{change}</table></div>"
            f"<b>loss change per token</b><br>"
            + bars(dloss, labels=[f"{i + 1} {t!r}" for i, t in enumerate(text)], cls="wb-tuner-dloss",
                   width=max(360, 5 * len(dloss)))
            + f'<p class="wb-tuner-continuation" data-pending="{int(result.continuation_pending)}">continuation before: '
            f"<code>{esc(repr(result.continuation_text_before))}</code><br>continuation now: "
            + ("<i>decoding…</i>" if result.continuation_pending else f"<code>{esc(repr(result.continuation_text_after))}</code>")
            + "</p></div>")

    def save_html(self, path: str | Path) -> Path:
        self.live.scheduler.flush()
        return super().save_html(path)
