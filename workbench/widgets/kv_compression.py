"""KVCompression: what MLA's latent cache saves, how much of the latent a layer really uses, and what truncating
it costs.

- Cache bytes per token and at a chosen context length (up to 1M tokens), MLA vs MHA vs GQA, from
  `costs.kv_bytes_per_token` for the loaded config, with the published DeepSeek-V2 / V3 / V3.2 / V4 shapes (the
  presets) as reference rows: the whole cache at the chosen dtype and in DeepSeek's released ("stored") formats, and
  each row's stored cache over V3.2's, with V4-Pro / V4-Flash at 1M next to the report's 10% / 7%.
- V4 has no MLA latent (one K = V head per window or compressed entry): on a V4 model the spectrum, the rank slider
  and the sweep say so instead of running.
- V3.2 / V4 sparse attention is truncated live instead (kv_truncation.SparseTruncation): the indexer's index_topk,
  V4's window and compressed branches, with KL, loss change and changed selections, and a KL-vs-index_topk sweep.
  V3.2 has both that panel and the latent controls; V2 / V3 show neither panel nor change.
- The singular-value spectrum of a layer's latent c_kv (`analysis.latent_spectrum`) on the live prompt or on a
  stored trace that recorded `kv_latent`.
- A rank slider: the latent of every layer truncated to rank r through the shared session's controls; the session
  reports KL and loss change, and the view adds the relative logit error. "Sweep" runs `Session.full_run` at a
  ladder of ranks (the session itself is left alone) for the error-vs-rank curve.
Shape legend: S prompt tokens, V vocab, C kv_lora_rank.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import xarray as xr

from workbench import analysis
from workbench.config import PRESETS, ModelConfig
from workbench.controls import Controls, LatentControl
from workbench.model.costs import kv_bytes_per_token
from workbench.session import ApplyResult
from workbench.widgets.kv_truncation import SparseTruncation, indexer_layers
from workbench.widgets.live import LiveSession
from workbench.widgets.svg_charts import line_chart
from workbench.widgets.trace_source import load_trace
from workbench.widgets.view import ModelArg, View, heading, resolve_live

REFERENCE_PRESETS = ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash",
                     "deepseek-v4-pro")
CONTEXTS = (1024, 4096, 32768, 131072, 163840, 1048576)
# DeepSeek-V4's report: the KV cache at 1M tokens is 10% (Pro) / 7% (Flash) of DeepSeek-V3.2's, in the released
# cache formats. Shown next to our figures (`v32_ratios`), which come from the cost maths.
PUBLISHED_V32_RATIOS = {"deepseek-v4-pro": 0.10, "deepseek-v4-flash": 0.07}
RATIO_CONTEXT = 1 << 20
NO_LATENT = ("this model has no MLA latent: DeepSeek-V4 caches one shared key = value head per window or compressed "
             "entry, so there is no c_kv spectrum and no latent rank to truncate")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cache_kind(config: ModelConfig) -> str:
    if config.is_v4:
        return "V4 window + compressed"
    return "MLA + indexer" if config.model_type == "deepseek_v32" else "MLA"


def cache_table(configs: dict[str, ModelConfig], context: int, dtype_bytes: int) -> list[dict[str, Any]]:
    """Per config: bytes per token and at `context` tokens, from `costs.kv_bytes_per_token(cfg, dtype_bytes,
    context=context)`. Every row has `total` (the whole cache at `dtype_bytes` per element), `stored` (DeepSeek's
    released formats), their `_ctx` values and `v32_ratio` (stored at `context` over DeepSeek-V3.2's). MLA rows
    (V2/V3/V3.2) also have `mla`, `mha`, `gqa`, `gqa_groups`, their `_ctx` values and `mha_over_mla`; V4 rows have
    None there (no latent, one K = V head) and `window` / `compressed` / `indexer` instead."""
    if context < 1:
        raise ValueError(f"context length must be >= 1, got {context}")
    v32 = kv_bytes_per_token(PRESETS["deepseek-v3.2"], dtype_bytes, context=context)["stored"]
    rows = []
    for name, cfg in configs.items():
        kv = kv_bytes_per_token(cfg, dtype_bytes, context=context)
        row: dict[str, Any] = {"name": name, "kind": cache_kind(cfg), "layers": cfg.num_hidden_layers,
                               "total": kv["total"], "stored": kv["stored"], "total_ctx": kv["total"] * context,
                               "stored_ctx": kv["stored"] * context, "v32_ratio": kv["stored"] / v32}
        if cfg.is_v4:
            row.update(dict.fromkeys(("mla", "mha", "gqa", "gqa_groups", "mla_ctx", "mha_ctx", "gqa_ctx",
                                      "mha_over_mla")))
            row.update({k: kv[k] for k in ("window", "compressed", "indexer")})
        else:
            row.update({"mla": kv["mla"], "mha": kv["mha"], "gqa": kv["gqa"], "gqa_groups": int(kv["gqa_groups"]),
                        "mla_ctx": kv["mla"] * context, "mha_ctx": kv["mha"] * context,
                        "gqa_ctx": kv["gqa"] * context, "mha_over_mla": kv["mha"] / kv["mla"],
                        "window": None, "compressed": None, "indexer": kv.get("indexer")})
        rows.append(row)
    return rows


def v32_ratios(context: int = RATIO_CONTEXT) -> dict[str, float]:
    """Stored KV cache of V4-Pro / V4-Flash over DeepSeek-V3.2's at `context` tokens (the report's 10% / 7% at 1M)."""
    v32 = kv_bytes_per_token(PRESETS["deepseek-v3.2"], context=context)["stored"]
    return {name: kv_bytes_per_token(PRESETS[name], context=context)["stored"] / v32 for name in PUBLISHED_V32_RATIOS}


def relative_logit_error(now: torch.Tensor, base: torch.Tensor) -> float:
    """||now - base|| / ||base|| over all prompt positions and the vocabulary ([S, V] each)."""
    return float((now.float() - base.float()).norm() / base.float().norm().clamp_min(1e-12))


class KVCompression(View):
    """Cache sizes (MLA vs MHA vs GQA), the latent spectrum, and the error of a rank-r latent."""

    title = "KV compression"

    def __init__(self, model: ModelArg | None = None, *, trace: str | Path | xr.Dataset | None = None,
                 prompt: str | None = None, live: LiveSession | None = None) -> None:
        self.live = resolve_live(model, prompt, live)
        cfg = self.live.config
        self.has_latent = not cfg.is_v4  # V4 has no MLA latent: the spectrum and the rank slider do not apply
        self.C = cfg.kv_lora_rank if self.has_latent else 0
        self.stored: xr.Dataset | None = None
        if trace is not None:
            ds = load_trace(trace)
            if "kv_latent" in ds and self.has_latent:  # the spectrum of a corpus beats one prompt's
                self.stored = ds
        self._spectrum_cache: dict[str, xr.Dataset] = {}
        self.sweep_points: list[tuple[int, float]] = []
        self.context = widgets.Dropdown(options=list(CONTEXTS), value=32768, description="context")
        self.dtype = widgets.Dropdown(options={"bf16 (2 B)": 2, "fp8 (1 B)": 1}, value=2, description="cache dtype")
        self.costs = widgets.HTML()
        sources = (["trace"] if self.stored is not None else []) + ["live"]
        self.spectrum_source = widgets.ToggleButtons(options=sources, value=sources[0], description="latents")
        self.layer_picker = widgets.Dropdown(options=list(range(cfg.num_hidden_layers)), value=cfg.num_hidden_layers - 1,
                                             description="layer")
        self.spectrum = widgets.HTML()
        self.rank = widgets.IntSlider(max(1, self.C), min=1, max=max(1, self.C), description="latent rank",
                                      continuous_update=True, disabled=not self.has_latent)
        self.basis = widgets.ToggleButtons(options=["svd", "raw"], value="svd", description="basis")
        self.sweep_button = widgets.Button(description="sweep ranks", disabled=not self.has_latent)
        self.error = widgets.HTML()
        self.sweep = widgets.HTML()
        # V3.2 / V4: the indexer budget, V4's window and compressed branches (None on MLA-only models)
        self.sparse = SparseTruncation(self.live) if cfg.is_v4 or indexer_layers(cfg) else None
        super().__init__([
            heading("KV compression", f"{self.live.loaded.name}: " + (
                f"kv_lora_rank {self.C}, " if self.has_latent else
                f"no MLA latent (head_dim {cfg.head_dim}, window {cfg.sliding_window}), ")
                + f"rope key {cfg.qk_rope_head_dim}, {cfg.num_attention_heads} heads"),
            widgets.HBox([self.context, self.dtype]), self.costs,
            widgets.HBox([self.spectrum_source, self.layer_picker]), self.spectrum,
            widgets.HBox([self.rank, self.basis, self.sweep_button]), self.error, self.sweep,
            *([self.sparse] if self.sparse is not None else [])])
        for w in (self.context, self.dtype):
            w.observe(lambda _: self.refresh_costs(), names="value")
        for w in (self.spectrum_source, self.layer_picker):
            w.observe(lambda _: self.refresh_spectrum(), names="value")
        for w in (self.rank, self.basis):
            w.observe(lambda _: self._rank_changed(), names="value")
        self.sweep_button.on_click(lambda _: self.run_sweep())
        self.live.on_result(self._show_result)
        self.live.on_prompt(self._prompt_changed)
        self.refresh_costs()
        self.refresh_spectrum()
        self._show_result(self.live.result)

    # ------------------------------------------------------------------ costs
    def cost_rows(self) -> list[dict[str, Any]]:
        configs = {f"{self.live.loaded.name} (loaded)": self.live.config}
        configs.update({name: PRESETS[name] for name in REFERENCE_PRESETS})
        return cache_table(configs, int(self.context.value), int(self.dtype.value))

    def refresh_costs(self) -> None:
        ctx = int(self.context.value)
        rows = self.cost_rows()
        bars = (("total", "#1f77b4"), ("stored", "#9467bd"), ("gqa", "#ff7f0e"), ("mha", "#d62728"))
        top = max(r[k + "_ctx"] for r in rows for k, _ in bars if r[k + "_ctx"] is not None)
        cells = []
        for r in rows:
            bar = "".join(f'<div title="{k} {human_bytes(r[k + "_ctx"])}" style="height:6px;margin:1px 0;'
                          f'background:{c};width:{max(1.0, 160 * r[k + "_ctx"] / top):.1f}px"></div>'
                          for k, c in bars if r[k + "_ctx"] is not None)
            if r["mla"] is not None:
                mla_cells = (f'<td>{human_bytes(r["mla"])}</td><td>{human_bytes(r["gqa"])} ({r["gqa_groups"]} '
                             f'groups)</td><td>{human_bytes(r["mha"])}</td><td>{r["mha_over_mla"]:.1f}x</td>')
                data = f'data-mla="{r["mla"]:.0f}" data-mha="{r["mha"]:.0f}" '
            else:
                mla_cells = ('<td colspan="4">no latent, one K = V head: window '
                             f'{human_bytes(r["window"])} + compressed {human_bytes(r["compressed"])} + indexer '
                             f'{human_bytes(r["indexer"])}</td>')
                data = ""
            cells.append(f'<tr class="wb-kv-row" data-name="{html.escape(r["name"])}" {data}'
                         f'data-total="{r["total"]:.6g}" data-stored="{r["stored"]:.6g}" '
                         f'data-v32-ratio="{r["v32_ratio"]:.6g}"><td>{html.escape(r["name"])}</td>'
                         f'<td>{html.escape(r["kind"])}</td><td>{r["layers"]}</td>{mla_cells}'
                         f'<td>{human_bytes(r["total"])}</td><td>{human_bytes(r["stored"])}</td>'
                         f'<td class="wb-kv-ctx">{human_bytes(r["total_ctx"])} / {human_bytes(r["stored_ctx"])}</td>'
                         f'<td>{100 * r["v32_ratio"]:.1f}%</td><td>{bar}</td></tr>')
        head = "".join(f'<th style="text-align:left;padding:1px 6px">{h}</th>' for h in
                       ("config", "cache", "layers", "MLA / token", "GQA / token", "MHA / token", "MHA ÷ MLA",
                        "total / token", "stored / token", f"total / stored at {ctx:,} tokens",
                        "stored ÷ V3.2", ""))
        ours = v32_ratios(RATIO_CONTEXT)
        ratios = " · ".join(f'<span class="wb-kv-ratio" data-name="{name}" data-ours="{ours[name]:.6g}" '
                            f'data-published="{pub:g}">{name}: {100 * ours[name]:.1f}% (published {100 * pub:.0f}%)'
                            f"</span>" for name, pub in PUBLISHED_V32_RATIOS.items())
        self.costs.value = (f'<table class="wb-kv-costs" data-context="{ctx}" style="border-collapse:collapse;'
                            f'font-size:12px"><tr>{head}</tr>{"".join(cells)}</table>'
                            f'<div class="wb-kv-ratios">stored KV cache vs DeepSeek-V3.2 at {RATIO_CONTEXT:,} tokens: '
                            f"{ratios}. total: {int(self.dtype.value)} B per element; stored: DeepSeek's released "
                            "cache formats (V2/V3 bf16, V3.2 FP8 latent, V4 FP8 + bf16 rope, FP4 indexer keys)</div>")

    # ------------------------------------------------------------------ spectrum
    def latent_spectrum(self) -> xr.Dataset:
        """analysis.latent_spectrum of the chosen source (live: the prompt's latents with no controls)."""
        if not self.has_latent:
            raise ValueError(NO_LATENT)
        name = str(self.spectrum_source.value)
        if name not in self._spectrum_cache:
            ds = self.stored if name == "trace" else self.live.trace_prompt(["kv_latent"])
            assert ds is not None
            self._spectrum_cache[name] = analysis.latent_spectrum(ds)
        return self._spectrum_cache[name]

    def refresh_spectrum(self) -> None:
        if not self.has_latent:
            self.spectrum.value = f'<div class="wb-kv-no-latent">{html.escape(NO_LATENT)}</div>'
            return
        spec = self.latent_spectrum().sel(layer_all=int(self.layer_picker.value))
        sv = np.asarray(spec["singular_values"].values)
        energy = np.cumsum(np.asarray(spec["energy"].values))
        r = int(self.rank.value)
        chart = line_chart({"s_i / s_1": [(i + 1, float(s / sv[0])) for i, s in enumerate(sv)] if sv[0] > 0 else [],
                            "energy kept": [(i + 1, float(e)) for i, e in enumerate(energy)]},
                           xlabel="component", ylabel="", log_y=False, cls="wb-kv-spectrum")
        self.spectrum.value = (f'<div class="wb-kv-spectrum-box" data-effective-rank="{float(spec["effective_rank"]):.3f}">'
                               f"layer {int(self.layer_picker.value)}: effective rank "
                               f"{float(spec['effective_rank']):.1f} of {len(sv)}; rank {r} keeps "
                               f"{100 * energy[r - 1]:.1f}% of the energy<br>{chart}</div>")

    # ------------------------------------------------------------------ truncation
    def latent_control(self) -> LatentControl | None:
        r = int(self.rank.value)
        return None if r >= self.C else LatentControl(r, str(self.basis.value))  # type: ignore[arg-type]

    def _rank_changed(self) -> None:
        if not self.has_latent:
            return
        try:
            self.live.update(latent={"all": self.latent_control()})
        except ValueError as e:
            self.error.value = f'<div class="wb-error" style="color:#b00">{html.escape(str(e))}</div>'
            return
        self.refresh_spectrum()

    def _show_result(self, result: ApplyResult) -> None:
        base = self.live.session.baseline.logits
        rel = relative_logit_error(result.logits, base)
        mean_dloss = float(result.loss_delta.mean())
        if not self.has_latent:
            self.error.value = (f'<div class="wb-kv-error wb-kv-no-latent" data-kl="{result.kl:.6g}" '
                                f'data-rel="{rel:.6g}">{html.escape(NO_LATENT)}</div>')
            return
        lc = result.controls.latent_for(self.live.config.num_hidden_layers - 1)
        what = f"rank {lc.rank} ({lc.basis})" if lc is not None else f"full rank {self.C}"
        self.error.value = (f'<div class="wb-kv-error" data-kl="{result.kl:.6g}" data-rel="{rel:.6g}">latent {what}: '
                            f"KL(base‖now) {result.kl:.4g} nats · relative logit error {rel:.3g} · mean loss change "
                            f"{mean_dloss:+.4g} nats/token · next token "
                            f"{html.escape(repr(result.top_after[0].text))} (was "
                            f"{html.escape(repr(result.top_before[0].text))})</div>")

    def _prompt_changed(self) -> None:
        self._spectrum_cache.pop("live", None)
        self.sweep_points = []
        self.sweep.value = ""
        self.refresh_spectrum()

    def run_sweep(self, ranks: list[int] | None = None) -> list[tuple[int, float]]:
        """KL vs rank (svd basis, every layer), each a full re-run that leaves the session as it is."""
        if not self.has_latent:
            raise ValueError(NO_LATENT)
        if ranks is None:
            ranks = sorted({max(1, self.C >> i) for i in range(int(math.log2(self.C)) + 1)})
        bad = [r for r in ranks if not 1 <= r <= self.C]
        if bad:
            raise ValueError(f"ranks {bad} are outside 1..kv_lora_rank={self.C}")
        basis = str(self.basis.value)
        points = []
        with self.live.lock:
            for r in ranks:
                res = self.live.session.full_run(Controls(latent={"all": LatentControl(r, basis)}))  # type: ignore[arg-type]
                points.append((r, res.kl))
        self.sweep_points = points
        self.sweep.value = ('<div class="wb-kv-sweep">KL(base‖rank r) with every layer truncated, '
                            f"{basis} basis<br>"
                            + line_chart({"KL": points}, xlabel="rank r", ylabel="KL (nats)", log_y=True,
                                         cls="wb-kv-sweep-chart") + "</div>")
        return points
