"""HyperConnections: DeepSeek-V4's mHC mixing matrices, per layer and site, as heat maps with their statistics.

Design choices:
- V4 keeps n residual streams; before each sublayer (hc_attn, hc_ffn) a Sinkhorn matrix M mixes them,
  X' = post y + M^T X, so M[i, j] is the weight stream i gives stream j. The view captures M from the probes
  (`blocks.L.hc_attn.hook_mix`, `blocks.L.hc_ffn.hook_mix`, [B, S, n, n]) in one run of the prompt under the live
  controls, on its own thread's listener and under the model's lock, so no other run's matrices mix in.
- It shows what the model mixes with: where an `mhc_identity` control is on, that is the identity (the probe still
  sees the Sinkhorn matrix the control replaces), and the view draws the identity, marked as such.
- The capture is shaped like a trace's `hc_mix` variable, so the statistics are `analysis.stream_mixing` itself
  (distance from the identity, self weight, largest off-diagonal weight, row / column sum errors).
- Matrices are small (n = hc_mult, 4 in DeepSeek-V4), so each is an HTML table: every cell coloured, labelled with
  its value and carrying it as data-value; the same markup serves the notebook, `workbench serve` and the export.
- The "identity mixing" picker sets `mhc_identity` on the shared session: every view shows its consequence.
Shape legend: S prompt tokens, A all layers, n mHC streams (hc_mult).
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import torch
import xarray as xr

from workbench import analysis
from workbench.controls import ControlError, Controls, LayerKey
from workbench.trace.schema import HC_SITES, LAYER_ALL, STREAM_IN, STREAM_OUT, TOKEN
from workbench.widgets.live import LiveSession
from workbench.widgets.view import ModelArg, View, heading, resolve_live

STYLE = """<style>
.wb-hc-matrix { border-collapse: collapse; font-size: 11px; margin: 2px 8px; }
.wb-hc-matrix caption { font-size: 11px; color: #444; }
.wb-hc-matrix th, .wb-hc-stat-table th { padding: 0 4px; font-weight: normal; }
.wb-hc-cell { width: 34px; height: 22px; text-align: center; }
.wb-hc-layer { margin: 6px 0; border-top: 1px solid #ddd; }
.wb-hc-stat-table { font-size: 11px; }
</style>"""
STATS = ("dist_identity", "self_weight", "max_offdiag", "row_error", "col_error")
STAT_LABELS = {"dist_identity": "‖M - I‖_F", "self_weight": "self weight", "max_offdiag": "max off-diagonal",
               "row_error": "row-sum error", "col_error": "column-sum error"}


def _colour(v: float) -> str:
    """White (0) to dark blue (1) for a mixing weight."""
    t = min(1.0, max(0.0, v)) if np.isfinite(v) else 0.0
    return f"rgb({int(255 - 225 * t)},{int(255 - 165 * t)},{int(255 - 75 * t)})"


def matrix_table(m: np.ndarray, *, layer: int, site: str, which: str, identity: bool) -> str:
    """One n x n matrix as a labelled heat map; rows are the streams mixed from, columns the streams mixed into."""
    n = m.shape[0]
    head = "".join(f"<th>→{j}</th>" for j in range(n))
    rows = []
    for i in range(n):
        cells = "".join(
            f'<td class="wb-hc-cell" data-layer="{layer}" data-site="{site}" data-which="{which}" data-in="{i}" '
            f'data-out="{j}" data-value="{m[i, j]:.9g}" title="L{layer} {site} {which}: stream {i} → {j} = '
            f'{m[i, j]:.4f}" style="background:{_colour(float(m[i, j]))};color:{"#fff" if m[i, j] > 0.55 else "#111"}">'
            f"{m[i, j]:.2f}</td>" for j in range(n))
        rows.append(f"<tr><th>{i}</th>{cells}</tr>")
    note = " (identity: mhc_identity)" if identity else ""
    return (f'<table class="wb-hc-matrix" data-layer="{layer}" data-site="{site}" data-which="{which}" '
            f'data-identity="{str(identity).lower()}"><caption>{site} · {html.escape(which)}{note}</caption>'
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>")


class HyperConnections(View):
    """Heat maps of the mHC matrices of every layer and site: the mean over the prompt and one chosen token."""

    title = "hyper-connections"

    def __init__(self, model: ModelArg | None = None, *, prompt: str | None = None,
                 live: LiveSession | None = None) -> None:
        self.live = resolve_live(model, prompt, live)
        cfg = self.live.config
        self.has_hc = cfg.is_v4 and cfg.hc_mult > 0
        self._cache: tuple[tuple[int, int], xr.Dataset] | None = None
        S = int(self.live.input_ids.shape[1])
        self.token = widgets.IntSlider(S - 1, min=0, max=S - 1, description="token", continuous_update=True,
                                       disabled=not self.has_hc)
        layers = list(range(cfg.num_hidden_layers)) if self.has_hc else []
        self.identity = widgets.SelectMultiple(options=layers, value=(), description="identity mixing", rows=4,
                                               disabled=not self.has_hc)
        self.message = widgets.HTML()
        self.body = widgets.HTML()
        note = (f"{cfg.hc_mult} residual streams, mixed before attention (hc_attn) and before the FFN (hc_ffn); "
                "M[i, j]: the weight stream i gives stream j") if self.has_hc else "no hyper-connections"
        super().__init__([heading("Hyper-connections (mHC)", f"{self.live.loaded.name}: {note}"),
                          widgets.HBox([self.token, self.identity]), self.message, self.body])
        self.token.observe(lambda _: self.refresh(), names="value")
        self.identity.observe(lambda _: self._identity_changed(), names="value")
        self.live.on_result(self.when_shown(self.refresh))
        self.live.on_prompt(self.when_shown(self._prompt_changed))
        self.refresh()

    # ------------------------------------------------------------------ data
    def no_hc_message(self) -> str:
        cfg = self.live.config
        return (f"this {cfg.model_type} model has no hyper-connections: mHC (n residual streams mixed by Sinkhorn "
                "matrices) is DeepSeek-V4's; this model has one residual stream per token")

    @torch.no_grad()
    def capture(self, controls: Controls | None = None) -> xr.Dataset:
        """`hc_mix` [S, A, 2, n, n] of the prompt under `controls` (default: the live ones), as the model mixes:
        the identity where mhc_identity is on. Cached per session generation for the live controls."""
        if not self.has_hc:
            raise ValueError(self.no_hc_message())
        live, cfg = self.live, self.live.config
        with live.lock:
            key = (id(live.session), live.session.generation)
            if controls is None and self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            run = controls if controls is not None else live.controls()
            names = [f"blocks.{layer}.{site}.hook_mix" for layer in range(cfg.num_hidden_layers) for site in HC_SITES]
            got = live.probe_run(names, run)
            S, n, A = int(live.input_ids.shape[1]), cfg.hc_mult, cfg.num_hidden_layers
            mix = np.empty((S, A, len(HC_SITES), n, n), dtype=np.float64)  # [S, A, 2, n, n]
            for layer in range(A):
                for s, site in enumerate(HC_SITES):
                    mix[:, layer, s] = (np.eye(n) if run.mhc_identity_for(layer)
                                        else got[f"blocks.{layer}.{site}.hook_mix"][0].double().numpy())
            ds = xr.Dataset({"hc_mix": ((TOKEN, LAYER_ALL, "hc_site", STREAM_IN, STREAM_OUT), mix)},
                            coords={LAYER_ALL: np.arange(A), "hc_site": list(HC_SITES)},
                            attrs={"controls": run.to_json()})
            if controls is None:
                self._cache = (key, ds)
            return ds

    def statistics(self, ds: xr.Dataset | None = None) -> xr.Dataset:
        """analysis.stream_mixing of the capture (default: the live one)."""
        return analysis.stream_mixing(self.capture() if ds is None else ds)

    # ------------------------------------------------------------------ updates
    def _identity_changed(self) -> None:
        chosen = {int(layer) for layer in self.identity.value}
        changes: dict[LayerKey, bool | None] = dict.fromkeys(chosen, True)
        changes.update({key: None for key in self.live.mhc_identity if key != "all" and key not in chosen})
        try:
            self.live.update(mhc_identity=changes)
        except ControlError as e:
            self.message.value = f'<div class="wb-error" style="color:#b00">{html.escape(str(e))}</div>'
            return
        self.message.value = ""

    def _prompt_changed(self) -> None:
        if not self.has_hc:
            return
        S = int(self.live.input_ids.shape[1])
        with self.token.hold_trait_notifications():
            self.token.value = min(int(self.token.value), S - 1)
            self.token.max = S - 1

    def refresh(self) -> None:
        if not self.has_hc:
            self.body.value = f'<div class="wb-hc-none">{html.escape(self.no_hc_message())}</div>'
            return
        ds = self.capture()
        stats = analysis.stream_mixing(ds)
        controls = Controls.from_json(ds.attrs["controls"])
        t = min(int(self.token.value), int(ds.sizes[TOKEN]) - 1)
        token_id = int(self.live.input_ids[0, t])
        text = self.live.tokenizer.token_text(token_id)
        mean = np.asarray(stats["mean_matrix"].values)  # [A, 2, n, n]
        one = np.asarray(ds["hc_mix"].values[t])  # [A, 2, n, n]
        blocks = []
        for layer in range(int(ds.sizes[LAYER_ALL])):
            ident = controls.mhc_identity_for(layer)
            tables = "".join(matrix_table(m[layer, s], layer=layer, site=site, which=which, identity=ident)
                             for s, site in enumerate(HC_SITES)
                             for which, m in (("mean", mean), (f"token {t}", one)))
            stat_rows = "".join(
                f'<tr class="wb-hc-stats" data-layer="{layer}" data-site="{site}" '
                + " ".join(f'data-{name.replace("_", "-")}="{float(stats[name].values[layer, s]):.9g}"'
                           for name in STATS)
                + f"><td>{site}</td>"
                + "".join(f"<td>{float(stats[name].values[layer, s]):.4f}</td>" for name in STATS) + "</tr>"
                for s, site in enumerate(HC_SITES))
            head = "".join(f"<th>{STAT_LABELS[name]}</th>" for name in STATS)
            kind = self.live.config.attention_kind(layer)
            blocks.append(f'<div class="wb-hc-layer" data-layer="{layer}" data-kind="{kind}">'
                          f"<b>layer {layer}</b> ({kind}){' · identity mixing (mhc_identity)' if ident else ''}"
                          f'<div style="display:flex;flex-wrap:wrap">{tables}</div>'
                          f'<table class="wb-hc-stat-table"><tr><th></th>{head}</tr>{stat_rows}</table></div>')
        self.body.value = (f'{STYLE}<div class="wb-hc" data-token="{t}" data-token-id="{token_id}" '
                           f'data-streams="{self.live.config.hc_mult}">mean over the prompt\'s {int(ds.sizes[TOKEN])} '
                           f"tokens and token {t} ({html.escape(repr(text))}); statistics over the prompt's tokens "
                           f"(analysis.stream_mixing){''.join(blocks)}</div>")
