"""FP8Error: where DeepSeek-V3's FP8 recipe loses precision in this model and what that does to its output.

A layer x site heatmap of mean relative error, the error per token, the KL of the next-token distribution and the
share of routing decisions that flip, all against the same model in high precision (fp8_comparison.py). A stored
trace recorded with FP8 on (`fp8_rel_error`) adds its corpus-wide heatmap beside the prompt's.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import xarray as xr

from workbench import analysis
from workbench.widgets.fp8_comparison import SITE_CHOICES, FP8Comparison, compare_fp8
from workbench.widgets.live import LiveSession
from workbench.widgets.svg_charts import bars, heatmap
from workbench.widgets.trace_source import load_trace
from workbench.widgets.view import ModelArg, View, heading, resolve_live


def error_heatmap(summary: xr.Dataset, cls: str) -> str:
    """summary["mean"] [layer_all, site] as a heatmap, dropping sites never simulated."""
    mean = np.asarray(summary["mean"].transpose("layer_all", "site").values, dtype=np.float64)  # [A, F]
    keep = np.asarray(np.isfinite(mean).any(axis=0), dtype=bool)  # [F]
    sites = [str(s) for s, k in zip(summary["site"].values.tolist(), keep.tolist(), strict=True) if k]
    rows = [f"layer {int(x)}" for x in summary["layer_all"].values]
    return heatmap(mean[:, keep].tolist(), rows=rows, cols=sites, cls=cls)


class FP8Error(View):
    """FP8 relative error per layer and site, per token, and its effect on the output and the routing."""

    title = "FP8 error"

    def __init__(self, model: ModelArg | None = None, *, trace: str | Path | xr.Dataset | None = None,
                 prompt: str | None = None, live: LiveSession | None = None, run: bool = True) -> None:
        self.live = resolve_live(model, prompt, live)
        self.stored: xr.Dataset | None = None
        if trace is not None:
            ds = load_trace(trace)
            if "fp8_rel_error" in ds:
                self.stored = ds
        self.comparison: FP8Comparison | None = None
        self.sites = widgets.SelectMultiple(options=list(SITE_CHOICES), value=list(SITE_CHOICES), description="sites",
                                            rows=4)
        self.ue8m0 = widgets.Checkbox(False, description="power-of-two scales (ue8m0)")
        self.run_button = widgets.Button(description="compare")
        self.report = widgets.HTML()
        self.stored_report = widgets.HTML()
        super().__init__([heading("FP8 error", "DeepSeek-V3 recipe (1x128 activation tiles, 128x128 weight blocks, "
                                  "e4m3) vs high precision, on the live prompt"),
                          widgets.HBox([self.sites, widgets.VBox([self.ue8m0, self.run_button])]),
                          self.report, self.stored_report])
        self.run_button.on_click(lambda _: self.run())
        self.live.on_prompt(self._prompt_changed)
        if self.stored is not None:
            self.stored_report.value = ("<b>stored trace</b> (mean relative error over its "
                                        f"{int(self.stored.sizes['token'])} tokens)<br>"
                                        + error_heatmap(analysis.fp8_error_summary(self.stored), "wb-fp8-stored"))
        if run:
            self.run()

    def _prompt_changed(self) -> None:
        self.run()

    def run(self) -> FP8Comparison | None:
        """Compare with the chosen sites; an impossible choice shows its error and keeps the last comparison."""
        try:
            self.comparison = compare_fp8(self.live, sites=list(self.sites.value), ue8m0=bool(self.ue8m0.value))
        except ValueError as e:
            self.report.value = (f'<div class="wb-error" style="color:#b00">{html.escape(str(e))}</div>'
                                 + self._render())
            return None
        self.report.value = self._render()
        return self.comparison

    def _render(self) -> str:
        c = self.comparison
        if c is None:
            return ""
        per_token = c.per_token_error()
        labels = [f"{i} {t!r}" for i, t in enumerate(c.text)]
        flips = "".join(f'<tr class="wb-fp8-flip" data-layer="{layer}" data-value="{f:.6g}"><td>layer {layer}</td>'
                        f"<td>{100 * f:.2f}%</td></tr>" for layer, f in c.flip.items())
        return (f'<div class="wb-fp8" data-kl-last="{c.kl_last:.6g}" data-kl-mean="{float(np.mean(c.kl_per_token)):.6g}">'
                f"<p>next-token KL(high precision ‖ FP8): last position {c.kl_last:.3g} nats, mean over positions "
                f"{float(np.mean(c.kl_per_token)):.3g} nats</p>"
                '<div style="display:flex;flex-wrap:wrap;gap:16px"><div><b>mean relative error by layer and site</b><br>'
                + error_heatmap(c.summary, "wb-fp8-heat")
                + '</div><div><b>routing decisions that flip</b><table class="wb-fp8-flips" style="font-size:12px">'
                + flips + "</table></div></div>"
                + "<b>relative error per token</b> (mean over simulated sites)<br>"
                + bars(per_token.tolist(), labels=labels, cls="wb-fp8-token", width=max(360, 6 * len(labels)))
                + "<br><b>KL per position</b><br>"
                + bars(c.kl_per_token.tolist(), labels=labels, cls="wb-fp8-kl", width=max(360, 6 * len(labels)),
                       colour="#d62728")
                + "</div>")
