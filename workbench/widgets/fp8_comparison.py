"""One prompt through the model twice, in high precision and with DeepSeek-V3's FP8 recipe simulated at chosen
sites, and what differs: per-site relative error (from the `hook_fp8_rel_error` probes via the trace recorder),
KL of the next-token distribution at every position, and the share of routing decisions that flip.

FP8 is switched on with `enable_fp8` on the shared model and switched off again, site by site, for exactly what
was switched on, under the live session's lock; a model that already runs FP8 (an FP8 checkpoint kept in e4m3) is
refused, since it has no high-precision side to compare with.
Shape legend: S prompt tokens, V vocab, A all layers, F simulated sites, L MoE layers, k top-k.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from workbench import analysis
from workbench.model.fp8 import disable_fp8, enable_fp8, fp8_sites
from workbench.trace.recorder import trace as record_trace
from workbench.widgets.live import LiveSession

SITE_CHOICES = ("attn", "experts", "shared_experts", "mlp")
_SWITCHED = re.compile(r"^blocks\.(\d+)\.(?:attn\.(\w+)|mlp\.(experts|shared_experts)(?:\.\w+)?|mlp\.\w+)$")


@dataclasses.dataclass(frozen=True)
class FP8Comparison:
    trace: xr.Dataset  # the FP8 run's trace: expert_ids, fp8_rel_error [S, A, F]
    summary: xr.Dataset  # analysis.fp8_error_summary(trace): mean/rms/max/frac_over [A, F]
    kl_per_token: np.ndarray  # [S] KL(high precision ‖ FP8) of the next-token distribution at each position
    flip: dict[int, float]  # MoE layer -> fraction of (token, slot) choices not in the high-precision top-k
    text: list[str]  # [S] token texts

    @property
    def kl_last(self) -> float:
        return float(self.kl_per_token[-1])

    def per_token_error(self) -> np.ndarray:
        """[S] mean relative error over every simulated (layer, site) of each token."""
        err = np.asarray(self.trace["fp8_rel_error"].values, dtype=np.float64)  # [S, A, F]
        return np.nanmean(err.reshape(err.shape[0], -1), axis=1)


def changed_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Mean over tokens of 1 - |top-k before ∩ top-k after| / k for [S, k] expert ids (order ignored)."""
    same = np.array([len(set(b.tolist()) & set(a.tolist())) for b, a in zip(before, after, strict=True)])
    return float(np.mean(1.0 - same / before.shape[1]))


def _restore(model: torch.nn.Module, switched: Sequence[str]) -> None:
    for name in switched:
        m = _SWITCHED.match(name)
        if m is None:
            raise AssertionError(f"unexpected FP8 site name {name!r}")
        layer = int(m.group(1))
        site = m.group(2) or m.group(3) or "mlp"
        disable_fp8(model, layers=[layer], sites=[site])  # type: ignore[arg-type]


@torch.no_grad()
def compare_fp8(live: LiveSession, *, sites: Sequence[str] = SITE_CHOICES, layers: Sequence[int] | None = None,
                ue8m0: bool = False) -> FP8Comparison:
    """High precision vs FP8 at `sites` of `layers` (default all) on the live prompt; see the module docstring."""
    model, ids = live.model, live.input_ids
    if not sites:
        raise ValueError(f"choose at least one FP8 site of {list(SITE_CHOICES)}")
    with live.lock:
        already = list(fp8_sites(model))
        if already:
            raise ValueError(f"the model already runs FP8 at {already[:3]}...; the FP8 view needs a "
                             "high-precision model to compare with (load it without keep_fp8)")
        with record_trace(model, sites=["expert_ids"], tokenizer=live.tokenizer) as t_hp:
            logits_hp = model(ids)[0]  # [S, V]
        switched = enable_fp8(model, layers=layers, sites=list(sites), ue8m0=ue8m0)
        try:
            with record_trace(model, sites=["expert_ids", "fp8_rel_error"], tokenizer=live.tokenizer) as t_fp8:
                logits_fp8 = model(ids)[0]  # [S, V]
        finally:
            _restore(model, switched)
    hp, fp8 = t_hp.to_xarray(), t_fp8.to_xarray()
    logp_hp, logp_fp8 = F.log_softmax(logits_hp, -1), F.log_softmax(logits_fp8, -1)  # [S, V]
    kl = (logp_hp.exp() * (logp_hp - logp_fp8)).sum(-1)  # [S]
    ids_hp = np.asarray(hp["expert_ids"].transpose("token", "layer", "slot").values)  # [S, L, k]
    ids_fp8 = np.asarray(fp8["expert_ids"].transpose("token", "layer", "slot").values)  # [S, L, k]
    flip = {int(layer): changed_fraction(ids_hp[:, i], ids_fp8[:, i]) for i, layer in enumerate(hp["layer"].values)}
    return FP8Comparison(fp8, analysis.fp8_error_summary(fp8), kl.cpu().numpy(), flip,
                         [str(x) for x in np.asarray(fp8["text"].values).tolist()])
