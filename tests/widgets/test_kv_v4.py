"""KVCompression with DeepSeek-V3.2 / V4: the cache table's rows equal `costs.kv_bytes_per_token` at every context
(V2/V3 rows unchanged), the V4 / V3.2 ratios at 1M tokens come from the costs and match the published 10% / 7%,
and the view and the whole dashboard open on a tiny V4 model, saying plainly that it has no MLA latent."""

from __future__ import annotations

import re

import pytest
import torch

from workbench.config import PRESETS, ModelConfig
from workbench.loader import LoadedModel
from workbench.model.costs import kv_bytes_per_token
from workbench.model.transformer import DeepSeekModel
from workbench.widgets import KVCompression, Workbench
from workbench.widgets.kv_compression import (
    CONTEXTS,
    NO_LATENT,
    PUBLISHED_V32_RATIOS,
    RATIO_CONTEXT,
    REFERENCE_PRESETS,
    cache_table,
    v32_ratios,
)
from workbench.widgets.live import LiveSession


@pytest.fixture(scope="module")
def v4_loaded(loaded: LoadedModel) -> LoadedModel:
    """A random tiny-v4 model with the byte tokenizer of tiny-random (its ids fit tiny-v4's vocabulary)."""
    torch.manual_seed(0)
    model = DeepSeekModel.random(ModelConfig.from_name("tiny-v4"))
    assert model.config.is_v4
    return LoadedModel(model, loaded.tokenizer, "tiny-v4", "random:tiny-v4:0")


def test_reference_rows_equal_the_cost_maths_up_to_1m_tokens() -> None:
    assert {"deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"} <= set(REFERENCE_PRESETS)
    assert max(CONTEXTS) == 1048576
    configs = {name: PRESETS[name] for name in REFERENCE_PRESETS}
    for dtype_bytes in (2, 1):
        for ctx in CONTEXTS:
            v32 = kv_bytes_per_token(PRESETS["deepseek-v3.2"], dtype_bytes, context=ctx)["stored"]
            for row in cache_table(configs, ctx, dtype_bytes):
                cfg = PRESETS[row["name"]]
                kv = kv_bytes_per_token(cfg, dtype_bytes, context=ctx)
                assert row["total"] == kv["total"] and row["stored"] == kv["stored"]
                assert row["total_ctx"] == kv["total"] * ctx and row["stored_ctx"] == kv["stored"] * ctx
                assert row["v32_ratio"] == pytest.approx(kv["stored"] / v32, rel=1e-12)
                if cfg.is_v4:
                    assert row["mla"] is None and row["mha"] is None and row["gqa"] is None
                    assert (row["window"], row["compressed"], row["indexer"]) == (
                        kv["window"], kv["compressed"], kv["indexer"])
                else:  # MLA rows: the V2/V3 numbers, context-independent
                    flat = kv_bytes_per_token(cfg, dtype_bytes)
                    assert (row["mla"], row["mha"], row["gqa"]) == (flat["mla"], flat["mha"], flat["gqa"])
                    assert row["mla_ctx"] == flat["mla"] * ctx
                    assert row["mha_over_mla"] == pytest.approx(flat["mha"] / flat["mla"])
    # V4's window share per token shrinks with the context; V3.2's cache per token does not
    short, long = (cache_table({"f": PRESETS["deepseek-v4-flash"], "v": PRESETS["deepseek-v3.2"]}, c, 2)
                   for c in (1024, 1048576))
    assert short[0]["total"] > long[0]["total"] and short[1]["total"] == long[1]["total"]


def test_v2_v3_rows_keep_their_numbers() -> None:
    (row,) = cache_table({"v3": PRESETS["deepseek-v3"]}, context=1000, dtype_bytes=2)
    assert row["mla"] == row["total"] == 61 * 576 * 2  # the published 70 KB per token
    assert row["stored"] == row["mla"]  # V3's released code caches bf16


def test_ratios_at_1m_come_from_the_costs_and_match_the_report() -> None:
    ours = v32_ratios()
    assert RATIO_CONTEXT == 1 << 20
    v32 = kv_bytes_per_token(PRESETS["deepseek-v3.2"], context=RATIO_CONTEXT)["stored"]
    for name, published in PUBLISHED_V32_RATIOS.items():
        want = kv_bytes_per_token(PRESETS[name], context=RATIO_CONTEXT)["stored"] / v32
        assert ours[name] == pytest.approx(want, rel=1e-12)
        assert ours[name] == pytest.approx(published, abs=0.005)  # report: 10% (Pro), 7% (Flash)
    rows = {r["name"]: r for r in cache_table({n: PRESETS[n] for n in PUBLISHED_V32_RATIOS}, RATIO_CONTEXT, 2)}
    assert {n: r["v32_ratio"] for n, r in rows.items()} == pytest.approx(ours, rel=1e-12)


def test_view_on_a_v4_model_shows_the_table_and_no_latent(v4_loaded: LoadedModel) -> None:
    live = LiveSession(v4_loaded, "the expert routes a token", continuation=2)
    view = KVCompression(live=live)
    assert not view.has_latent and view.rank.disabled and view.sweep_button.disabled
    assert "no MLA latent" in view.spectrum.value and "no MLA latent" in view.error.value
    view.context.value = 1048576
    html = view.costs.value
    assert 'data-context="1048576"' in html
    loaded_kv = kv_bytes_per_token(v4_loaded.model.config, 2, context=1048576)
    assert f'data-name="tiny-v4 (loaded)" data-total="{loaded_kv["total"]:.6g}"' in html
    for name in ("deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro", "deepseek-v3"):
        kv = kv_bytes_per_token(PRESETS[name], 2, context=1048576)
        assert re.search(f'data-name="{re.escape(name)}" [^>]*data-stored="{kv["stored"]:.6g}"', html)
    ours = v32_ratios()
    for name in PUBLISHED_V32_RATIOS:
        assert f'data-name="{name}" data-ours="{ours[name]:.6g}"' in html
    view._rank_changed()  # no latent control reaches the session
    assert live.session.controls.latent == {}
    with pytest.raises(ValueError, match="no MLA latent"):
        view.run_sweep([1])
    with pytest.raises(ValueError, match="no MLA latent"):
        view.latent_spectrum()
    live.set_prompt("a different prompt")  # re-runs the view's listeners
    assert view.spectrum.value.count(NO_LATENT[:20]) == 1


def test_dashboard_opens_on_a_v4_model(v4_loaded: LoadedModel) -> None:
    dash = Workbench(v4_loaded, prompt="hello experts", background=False)
    assert not dash.kv.has_latent and "no MLA latent" in dash.kv.spectrum.value
    dash.set_prompt("the token routes the expert")
    assert "deepseek-v4-pro" in dash.kv.costs.value
