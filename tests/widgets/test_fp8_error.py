"""FP8Error: the heatmap is analysis.fp8_error_summary of the probes' errors, KL and routing flips equal a direct
high-precision vs FP8 comparison with enable_fp8, and the model is left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.model.fp8 import disable_fp8, enable_fp8, fp8_sites
from workbench.widgets import FP8Error
from workbench.widgets.fp8_comparison import changed_fraction, compare_fp8
from workbench.widgets.live import LiveSession


def _routing(live: LiveSession) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] = {}
    names = [f"blocks.{layer}.mlp.hook_expert_indices" for layer in live.config.moe_layers]
    with live.model.probes.listen(names, lambda n, v: got.__setitem__(int(n.split(".")[1]), v.numpy().copy())):
        logits = live.model(live.input_ids)[0]
    got[-1] = logits.numpy()
    return got


def test_comparison_equals_a_direct_run(live: LiveSession) -> None:
    with torch.no_grad():
        base_logits = live.model(live.input_ids)
        hp = _routing(live)
        enable_fp8(live.model, sites=["experts", "attn"])
        lp = _routing(live)
        disable_fp8(live.model)
    c = compare_fp8(live, sites=["experts", "attn"])
    p, q = F.log_softmax(torch.tensor(hp[-1]), -1), F.log_softmax(torch.tensor(lp[-1]), -1)
    want_kl = (p.exp() * (p - q)).sum(-1).numpy()  # [S]
    np.testing.assert_allclose(c.kl_per_token, want_kl, rtol=1e-5, atol=1e-9)
    for layer in live.config.moe_layers:
        same = [len(set(a) & set(b)) for a, b in zip(hp[layer].tolist(), lp[layer].tolist(), strict=True)]
        assert c.flip[layer] == pytest.approx(1 - np.mean(same) / hp[layer].shape[1])
    # heatmap cells: mean over tokens of the per-token relative errors the probes reported
    err = c.trace["fp8_rel_error"].values  # [S, A, F]
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        np.testing.assert_allclose(c.summary["mean"].values, np.nanmean(err, axis=0), rtol=1e-6)
    sites = [str(s) for s in c.summary["site"].values]
    simulated = np.isfinite(c.summary["mean"].values).any(axis=0)
    assert {s for s, on in zip(sites, simulated, strict=True) if on} >= {"mlp.experts", "attn.q_a_proj"}
    assert not any(on for s, on in zip(sites, simulated, strict=True) if s.startswith("mlp.shared"))
    # 3 mantissa bits: a few percent per linear (README: ~3-4% RMS on random tiny models)
    assert 0.005 < float(np.nanmean(c.summary["mean"].values)) < 0.1
    # the model is back in high precision, bit for bit
    assert list(fp8_sites(live.model)) == []
    with torch.no_grad():
        assert torch.equal(live.model(live.input_ids), base_logits)


def test_view_renders_heatmap_and_effects(live: LiveSession) -> None:
    view = FP8Error(live=live)
    c = view.comparison
    assert c is not None
    assert f'data-kl-last="{c.kl_last:.6g}"' in view.report.value
    cells = view.report.value.count('class="wb-fp8-heat-cell"')
    assert cells == 3 * int(np.isfinite(c.summary["mean"].values).any(axis=0).sum())
    for layer, f in c.flip.items():
        assert f'data-layer="{layer}" data-value="{f:.6g}"' in view.report.value


def test_no_site_is_an_error_that_keeps_the_last_comparison(live: LiveSession) -> None:
    view = FP8Error(live=live)
    kept = view.comparison
    view.sites.value = ()
    assert view.run() is None
    assert "choose at least one FP8 site" in view.report.value
    assert view.comparison is kept and 'class="wb-fp8"' in view.report.value


def test_a_model_already_in_fp8_is_refused(live: LiveSession) -> None:
    enable_fp8(live.model, layers=[0], sites=["attn"])
    try:
        with pytest.raises(ValueError, match="already runs FP8"):
            compare_fp8(live)
        assert len(list(fp8_sites(live.model))) > 0  # nothing of the user's FP8 setup was undone
    finally:
        disable_fp8(live.model)


def test_changed_fraction_ignores_order() -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert changed_fraction(a, a[:, ::-1]) == 0.0
    assert changed_fraction(a, np.array([[1, 2, 9], [7, 8, 9]])) == pytest.approx((1 / 3 + 1) / 2)
