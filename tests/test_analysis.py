"""Each analysis on a small trace, eager and lazy (from a store), against a straightforward numpy computation."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from workbench import analysis
from workbench.loader import load_model
from workbench.trace import open_trace

sys.path.insert(0, str(Path(__file__).parent / "trace"))
from trace_helpers import corpus, write_store

SITES = ["expert_ids", "expert_weights", "kv_latent"]


@pytest.fixture(scope="module", params=["eager", "lazy"])
def ds(request, tmp_path_factory) -> xr.Dataset:
    loaded = load_model("default-v3")  # MLA: the kv_latent analyses need its latent
    path = tmp_path_factory.mktemp("an") / "t.zarr"
    write_store(path, loaded, corpus(30, seed=4), SITES, chunk_tokens=50)
    lazy = open_trace(path)
    assert lazy.expert_ids.chunks is not None
    return lazy if request.param == "lazy" else lazy.compute()


def numpy_ids(ds):
    return ds.expert_ids.values  # [N, L, k]


def test_expert_load_and_balance(ds):
    ids = numpy_ids(ds)
    N, L, k = ids.shape
    E = ds.sizes.get("expert", 16)
    load = np.array([[np.sum(ids[:, l] == e) for e in range(E)] for l in range(L)])
    got = analysis.expert_load(ds).compute()
    np.testing.assert_array_equal(got.values, load)
    assert got.sum() == N * k * L
    bal = analysis.load_balance(ds).compute()
    p = load / load.sum(1, keepdims=True)
    ent = np.array([-sum(x * np.log(x) for x in row if x > 0) for row in p])
    np.testing.assert_allclose(bal.cv, load.std(1) / load.mean(1))
    np.testing.assert_allclose(bal.entropy, ent)
    np.testing.assert_allclose(bal.entropy_norm, ent / np.log(E))
    np.testing.assert_allclose(bal.max_over_mean, load.max(1) / load.mean(1))


def test_token_expert_lift_and_top_tokens(ds):
    ids, tok = numpy_ids(ds), ds.token_id.values
    N = ids.shape[0]
    got = analysis.token_expert_lift(ds, min_count=2)
    table = {(int(a), int(b), int(c)): (int(n), float(x)) for a, b, c, n, x in
             zip(got.layer.values, got.expert.values, got.token_id.values, got["count"].values, got.lift.values,
                 strict=True)}
    expected = {}
    for li, layer in enumerate(ds.layer.values):
        for v in np.unique(tok):
            rows = tok == v
            for e in np.unique(ids[rows, li]):
                n = int(np.sum(ids[rows, li] == e))
                if n >= 2:
                    p_e = np.sum(ids[:, li] == e) / N
                    expected[(int(layer), int(e), int(v))] = (n, (n / rows.sum()) / p_e)
    assert table.keys() == expected.keys()
    for key, (n, lift) in expected.items():
        assert table[key][0] == n and table[key][1] == pytest.approx(lift)
    top = analysis.top_tokens_per_expert(ds, n=3, min_count=2)
    layer, e = int(ds.layer.values[0]), 5
    mine = sorted(((lift, v) for (la, ex, v), (_, lift) in expected.items() if la == layer and ex == e), reverse=True)
    np.testing.assert_allclose(top.lift.sel(layer=layer).values[e][: len(mine[:3])], [x for x, _ in mine[:3]])
    # each listed id carries its decoded text (the tokenizer's, as recorded); empty ranks carry ""
    tokenizer = load_model("default-v3").tokenizer
    ids_all, texts = top.token_id.values.ravel(), top.text.values.ravel()
    assert [str(x) for x in texts] == [tokenizer.token_text(int(t)) if t >= 0 else "" for t in ids_all]
    assert (ids_all < 0).any() and (ids_all >= 0).any()


def test_coactivation(ds):
    ids = numpy_ids(ds)
    N, L, _ = ids.shape
    E = 16
    count = np.zeros((L, E, E), dtype=np.int64)
    for n, l in itertools.product(range(N), range(L)):
        for a in ids[n, l]:
            for b in ids[n, l]:
                count[l, a, b] += 1
    got = analysis.coactivation(ds).compute()
    np.testing.assert_array_equal(got["count"].values, count)
    load = np.diagonal(count, axis1=1, axis2=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = count * N / (load[:, :, None] * load[:, None, :])
    lift[~np.isfinite(lift)] = np.nan
    np.testing.assert_allclose(got.lift.values, lift)


def test_routing_transitions(ds):
    ids = numpy_ids(ds)
    N, L, _ = ids.shape
    count = np.zeros((L - 1, 16, 16), dtype=np.int64)
    for n, l in itertools.product(range(N), range(L - 1)):
        for a in ids[n, l]:
            for b in ids[n, l + 1]:
                count[l, a, b] += 1
    got = analysis.routing_transitions(ds).compute()
    np.testing.assert_array_equal(got["count"].values, count)
    assert list(got.next_layer.values) == list(ds.layer.values[1:])
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got.prob.values, count / count.sum(-1, keepdims=True))


@pytest.mark.parametrize("center", [False, True])
def test_latent_spectrum(ds, center):
    x = ds.kv_latent.values.astype(np.float64)  # [N, A, C]
    got = analysis.latent_spectrum(ds, center=center)
    for a in range(x.shape[1]):
        m = x[:, a] - (x[:, a].mean(0) if center else 0)
        sv = np.linalg.svd(m, compute_uv=False)
        np.testing.assert_allclose(got.singular_values.values[a], sv, rtol=1e-6, atol=1e-6 * sv[0])
        p = sv / sv.sum()
        np.testing.assert_allclose(got.effective_rank.values[a], np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))),
                                   rtol=1e-6)


def test_fp8_error_summary_against_numpy():
    rng = np.random.default_rng(0)
    err = rng.lognormal(-5, 1, size=(200, 3, 2)).astype(np.float32)  # [N, A, F]
    err[:, 0] = np.nan  # layer 0 not simulated
    ds = xr.Dataset({"fp8_rel_error": (("token", "layer_all", "site"), err)},
                    coords={"layer_all": [0, 1, 2], "site": ["attn.q_b_proj", "mlp.experts"]})
    for data in (ds, ds.chunk({"token": 64})):
        got = analysis.fp8_error_summary(data, threshold=0.01).compute()
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(got["mean"].values[1:], err[:, 1:].mean(0), rtol=1e-5)
            np.testing.assert_allclose(got["max"].values[1:], err[:, 1:].max(0))
            np.testing.assert_allclose(got.rms.values[1:], np.sqrt((err[:, 1:].astype(np.float64) ** 2).mean(0)),
                                       rtol=1e-5)
            np.testing.assert_allclose(got.frac_over.values[1:], (err[:, 1:] > 0.01).mean(0))
        assert np.isnan(got["mean"].values[0]).all() and np.isnan(got.frac_over.values[0]).all()


def test_missing_variables_are_clear_errors(ds):
    with pytest.raises(ValueError, match="FP8 simulation was off"):
        analysis.fp8_error_summary(ds)
    with pytest.raises(ValueError, match="no kv_latent"):
        analysis.latent_spectrum(ds.drop_vars("kv_latent"))
