"""KVCompression: cache sizes from the cost maths (checked by hand for V3), the spectrum equals numpy's SVD of the
latents, and the rank slider goes through Session.apply with the right LatentControl."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from workbench.config import PRESETS
from workbench.controls import Controls, LatentControl
from workbench.widgets import KVCompression
from workbench.widgets.kv_compression import cache_table, human_bytes, relative_logit_error
from workbench.widgets.live import LiveSession


def test_v3_reference_row_is_the_published_shape() -> None:
    (row,) = cache_table({"v3": PRESETS["deepseek-v3"]}, context=1000, dtype_bytes=2)
    # 61 layers x (512 latent + 64 rope key) x 2 bytes = 70,272 B/token (70.3 KB, DeepSeek-V3's figure);
    # MHA: 61 x 128 heads x (192 + 128) x 2 B
    assert row["mla"] == 61 * 576 * 2 == 70272
    assert row["mha"] == 61 * 128 * (192 + 128) * 2
    assert row["mla_ctx"] == 70272 * 1000
    assert row["mha_over_mla"] == pytest.approx(row["mha"] / row["mla"])
    with pytest.raises(ValueError, match="context length must be >= 1"):
        cache_table({"v3": PRESETS["deepseek-v3"]}, context=0, dtype_bytes=2)
    assert human_bytes(70272) == "68.6 KiB"


def test_costs_follow_the_context_control(live: LiveSession) -> None:
    view = KVCompression(live=live)
    view.context.value = 4096
    assert 'data-context="4096"' in view.costs.value
    mla = live.model.kv_bytes_per_token()["mla"]
    assert f'data-mla="{mla:.0f}"' in view.costs.value
    assert "deepseek-v3" in view.costs.value and "deepseek-v2" in view.costs.value


def test_spectrum_equals_numpy_svd(live: LiveSession, corpus_trace: xr.Dataset) -> None:
    view = KVCompression(live=live, trace=corpus_trace)
    assert view.spectrum_source.value == "trace"
    spec = view.latent_spectrum()
    for layer in range(3):
        x = corpus_trace["kv_latent"].values[:, layer].astype(np.float64)  # [N, C]
        want = np.linalg.svd(x, compute_uv=False)
        np.testing.assert_allclose(spec["singular_values"].sel(layer_all=layer).values, want, rtol=1e-6,
                                   atol=1e-6 * want[0])


def test_rank_slider_applies_a_latent_control(live: LiveSession, monkeypatch: pytest.MonkeyPatch) -> None:
    view = KVCompression(live=live)
    calls: list[Controls] = []
    real = live.session.apply
    monkeypatch.setattr(live.session, "apply", lambda c, **kw: calls.append(c) or real(c, **kw))
    view.rank.value = 5
    assert calls[-1] == Controls(latent={"all": LatentControl(5, "svd")})
    view.basis.value = "raw"
    assert calls[-1] == Controls(latent={"all": LatentControl(5, "raw")})
    result = live.result
    assert f'data-kl="{result.kl:.6g}"' in view.error.value
    rel = relative_logit_error(result.logits, live.session.baseline.logits)
    base = live.session.baseline.logits
    want = float(torch.linalg.norm(result.logits - base) / torch.linalg.norm(base))
    assert rel == pytest.approx(want, rel=1e-6) and rel > 0
    view.rank.value = view.C  # full rank is "no control"
    assert calls[-1] == Controls()


def test_sweep_matches_full_runs_and_leaves_the_session(live: LiveSession) -> None:
    view = KVCompression(live=live)
    generation = live.session.generation
    points = view.run_sweep([4, 32])
    assert live.session.generation == generation  # full_run does not touch the session
    want = live.session.full_run(Controls(latent={"all": LatentControl(4, "svd")})).kl
    assert points[0] == (4, pytest.approx(want, rel=1e-9, abs=1e-12))
    assert abs(points[1][1]) < 1e-6  # full rank reproduces the baseline (an orthonormal basis of R^C)
    with pytest.raises(ValueError, match=r"ranks \[0\] are outside 1..kv_lora_rank=32"):
        view.run_sweep([0])
