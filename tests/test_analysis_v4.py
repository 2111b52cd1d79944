"""The V3.2 / V4 analyses, each against a plain numpy (or Python) computation on the same trace, in memory and
lazily from a store; and the dense-attention reference of indexer recall against MLA itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import analysis
from workbench.trace import Trace, TraceStore, open_trace
from workbench.trace.dense_topk import attention_probs, dense_attention_topk, dense_copy, v4_attention_probs


@pytest.fixture(scope="module")
def v4_trace(tmp_path_factory):
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4"), seed=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=g)
    ids[:, 24:] = ids[:, :24]  # repeats: hash layers see each id more than once
    t = Trace(model, ["all"])
    path = tmp_path_factory.mktemp("v4") / "t.zarr"
    store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
    with t:
        store.append(t.forward(ids), 2)
    store.close()
    return model, t.to_xarray(), open_trace(path)


@pytest.fixture(scope="module")
def v32():
    cfg = wb.ModelConfig.from_name("tiny").replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16,
                                                   index_topk=6)
    model = wb.DeepSeekModel.random(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with wb.trace(model, sites=["index_selected"]) as t:
        model(ids)
    return model, ids, t.to_xarray()


def _numpy_distances(ds):
    sel, pos = ds.index_selected.values, ds.pos.values
    ratios = ds.compress_ratio.values[ds.index_layer.values]
    near = np.full(sel.shape, np.nan)
    far = np.full(sel.shape, np.nan)
    for n, i, j in zip(*np.nonzero(sel >= 0), strict=True):
        m, w = int(ratios[i]), int(sel[n, i, j])
        lo, hi = (max(0, w - 1) * m if m == 4 else w * m, w * m + m - 1) if m else (w, w)  # CSA: overlapping half
        near[n, i, j], far[n, i, j] = pos[n] - hi, pos[n] - lo
    return near, far


def test_selected_distance_v4_and_v32(v4_trace, v32):
    _, mem, lazy = v4_trace
    for ds in (mem, lazy, v32[2]):
        d = analysis.selected_distance(ds)
        near, far = _numpy_distances(ds)
        np.testing.assert_array_equal(d.near.values, near)
        np.testing.assert_array_equal(d.far.values, far)
        assert np.nanmin(d.near.values) >= 0  # causal: an entry is complete before a query reads it
    v32_d = analysis.selected_distance(v32[2])
    np.testing.assert_array_equal(v32_d.near.values, v32_d.far.values)  # V3.2 selects single tokens
    summary = analysis.selection_distance_summary(lazy, bins=np.array([0, 4, 8, 16, 64]))
    near, far = _numpy_distances(mem)
    for i in range(near.shape[1]):
        vals = near[:, i][~np.isnan(near[:, i])]
        np.testing.assert_array_equal(summary.hist.values[i], np.histogram(vals, bins=[0, 4, 8, 16, 64])[0])
        assert int(summary["count"].values[i]) == len(vals)
        np.testing.assert_allclose(summary.mean_near.values[i], vals.mean(), rtol=1e-6)
        np.testing.assert_allclose(summary.mean_far.values[i], np.nanmean(far[:, i]), rtol=1e-6)
    with pytest.raises(ValueError, match="no index_selected"):
        analysis.selected_distance(mem.drop_vars("index_selected"))


def test_mass_split(v4_trace):
    _, mem, lazy = v4_trace
    out = analysis.mass_split(lazy)
    mass = mem.attn_mass.values  # [N, A, H, 3]
    np.testing.assert_allclose(out["mean"].values, mass.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(out["per_head"].values, mass.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["mean"].sum("branch").values, 1.0, rtol=1e-5)
    assert out["attn_kind"].values.tolist() == mem["attn_kind"].values.tolist()


def test_stream_mixing(v4_trace):
    _, mem, lazy = v4_trace
    out = analysis.stream_mixing(lazy)
    M = mem.hc_mix.values.astype(np.float64)  # [N, A, 2, n, n]
    n = M.shape[-1]
    eye = np.eye(n)
    want_dist = np.zeros(M.shape[1:3])
    want_off = np.zeros(M.shape[1:3])
    want_self = np.zeros(M.shape[1:3])
    want_row = np.zeros(M.shape[1:3])
    for a in range(M.shape[1]):
        for s in range(2):
            mats = M[:, a, s]
            want_dist[a, s] = np.mean([np.linalg.norm(x - eye) for x in mats])
            want_off[a, s] = np.mean([x[~eye.astype(bool)].max() for x in mats])
            want_self[a, s] = np.mean([np.trace(x) / n for x in mats])
            want_row[a, s] = np.mean([np.abs(x.sum(axis=1) - 1).max() for x in mats])
    np.testing.assert_allclose(out.dist_identity.values, want_dist, rtol=1e-9)
    np.testing.assert_allclose(out.max_offdiag.values, want_off, rtol=1e-9)
    np.testing.assert_allclose(out.self_weight.values, want_self, rtol=1e-9)
    np.testing.assert_allclose(out.row_error.values, want_row, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.mean_matrix.values, M.mean(axis=0), rtol=1e-9)
    assert (out.row_error.values < 1e-3).all() and (out.col_error.values < 1e-3).all()  # Sinkhorn: ~doubly stochastic


def test_routing_specialisation_hash_vs_learned(v4_trace):
    model, mem, lazy = v4_trace
    out = analysis.routing_specialisation(lazy)
    ids, tok = mem.expert_ids.values, mem.token_id.values  # [N, L, k], [N]
    N, L, k = ids.shape
    shuffled = analysis.routing_specialisation(mem, shuffle_seed=7)
    perm = tok[np.random.default_rng(7).permutation(N)]
    for i in range(L):
        for t_ids, got in ((tok, out.specialisation.values[i]), (perm, shuffled.specialisation_shuffled.values[i])):
            np.testing.assert_allclose(got, _plain_specialisation(t_ids, ids[:, i]), rtol=1e-9)
        joint: dict[tuple[int, int], int] = {}
        for n in range(N):
            for e in ids[n, i]:
                joint[(int(tok[n]), int(e))] = joint.get((int(tok[n]), int(e)), 0) + 1
        total = N * k
        p_t = {t: c / N for t, c in zip(*np.unique(tok, return_counts=True), strict=True)}
        p_e = {e: c / total for e, c in zip(*np.unique(ids[:, i], return_counts=True), strict=True)}
        mi = sum(c / total * math.log((c / total) / (p_t[t] * p_e[e])) for (t, e), c in joint.items())
        h_e = -sum(p * math.log(p) for p in p_e.values())
        np.testing.assert_allclose(out.mutual_info.values[i], mi, rtol=1e-9)
        np.testing.assert_allclose(out.specialisation.values[i], mi / (h_e - math.log(k)), rtol=1e-9)
    hashed = out.hash_routed.values
    assert hashed.tolist() == [i < model.config.num_hash_layers for i in range(L)] and hashed.any()
    np.testing.assert_allclose(out.specialisation.values[hashed], 1.0, rtol=1e-9)  # experts = tid2eid[token id]
    assert (out.specialisation_shuffled.values[hashed] < 1).all()  # shuffled ids break the function
    np.testing.assert_array_equal(out["load"].values, analysis.expert_load(mem).values)


def _plain_specialisation(tok: np.ndarray, ids: np.ndarray) -> float:
    """I(T; E) / (H(E) - log k) from the joint table of (token id, expert) choices, in numpy."""
    k = ids.shape[1]
    t_codes, t_idx = np.unique(tok, return_inverse=True)
    joint = np.zeros((len(t_codes), int(ids.max()) + 1))
    np.add.at(joint, (np.repeat(t_idx, k), ids.reshape(-1)), 1.0)
    p = joint / joint.sum()
    pt, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / (pt @ pe)[nz])).sum()
    h = -(pe[pe > 0] * np.log(pe[pe > 0])).sum()
    return float(mi / (h - np.log(k)))


def test_attention_probs_is_mla(v32):
    """The rebuilt probabilities times MLA's values give MLA's own per-head output (hook_z), every layer."""
    model, ids, _ = v32
    dense = dense_copy(model, ids.shape[1])
    found: dict[int, torch.Tensor] = {}
    zs: dict[str, torch.Tensor] = {}

    def hook(layer):
        def fn(module, args, kwargs):
            x, cos, sin, rotary = args[:4]
            p = attention_probs(module, x, cos, sin, rotary)  # [B, nH, S, S]
            c_kv = module.kv_a_layernorm(module.kv_a_proj_with_mqa(x)[..., : module.latent_dim])
            v = module.kv_b_proj(c_kv).view(*x.shape[:2], module.n_heads, -1)[..., module.nope_dim:]
            found[layer] = torch.einsum("bhst,bthv->bshv", p, v.float())
        return fn

    handles = [b.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(dense.layers)]
    try:
        with dense.probes.listen(["blocks.*.attn.hook_z"], lambda n, v: zs.__setitem__(n, v) or None), torch.no_grad():
            dense(ids)
    finally:
        for h in handles:
            h.remove()
    for layer, z in found.items():
        torch.testing.assert_close(z, zs[f"blocks.{layer}.attn.hook_z"].float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="V3.2 and V4"):
        dense_copy(wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny")), 4)


def test_indexer_recall(v32):
    model, ids, ds = v32
    B, S = ids.shape
    k = model.config.index_topk
    top = dense_attention_topk(model, ids)
    assert top.shape == (B * S, model.config.num_hidden_layers, k)
    # the dense top-k from plain numpy over the same probabilities
    dense = dense_copy(model, S)
    probs: dict[int, np.ndarray] = {}
    handles = [b.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: probs.__setitem__(i, attention_probs(m, *a[:4]).mean(1).numpy()) or None,
        with_kwargs=True) for i, b in enumerate(dense.layers)]
    with torch.no_grad():
        dense(ids)
    for h in handles:
        h.remove()
    for i, p in probs.items():
        for b in range(B):
            for s in range(S):
                order = sorted(range(s + 1), key=lambda t: (-p[b, s, t], t))[:k]
                want = order + [-1] * (k - len(order))
                assert top[b * S + s, i].tolist() == want
    out = analysis.indexer_recall(ds, top)
    sel, pos = ds.index_selected.values, ds.pos.values
    for i in range(sel.shape[1]):
        per = [len(set(sel[n, i][sel[n, i] >= 0]) & set(top[n, i][top[n, i] >= 0])) / (top[n, i] >= 0).sum()
               for n in range(len(pos))]
        choosing = [r for r, p in zip(per, pos, strict=True) if p + 1 > k]  # V3.2: keys = positions
        np.testing.assert_allclose(out.recall.values[i], np.mean(choosing), rtol=1e-12)
        np.testing.assert_allclose(out.recall_all.values[i], np.mean(per), rtol=1e-12)
        assert int(out.queries.values[i]) == len(choosing)
    assert np.allclose(analysis.indexer_recall(ds, sel).recall.values, 1.0)  # against itself: all kept
    with pytest.raises(ValueError, match="dense_topk must be"):
        analysis.indexer_recall(ds, top[:, :1])


def test_v4_indexer_recall_against_dense_entries():
    """V4: the rebuilt dense probabilities give the layer's own mass split (window / entries / sink), the dense
    top-k is a plain sort of their entry part, and recall is the plain set overlap."""
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4").replace(index_topk=4), seed=6)
    B, S, k = 2, 48, 4
    ids = torch.randint(0, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(2))
    with wb.trace(model) as t:
        model(ids)
    ds = t.to_xarray()
    dense = dense_copy(model, S)
    rebuilt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    mass: dict[str, torch.Tensor] = {}
    handles = [b.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: rebuilt.__setitem__(i, v4_attention_probs(m, a[0], a[1])) or None, with_kwargs=True)
        for i, b in enumerate(dense.layers)]
    with dense.probes.listen(["blocks.*.attn.hook_attn_mass"], lambda n, v: mass.__setitem__(n, v) or None), \
            torch.no_grad():
        dense(ids)
    for h in handles:
        h.remove()
    for i, (window, entries) in rebuilt.items():
        got = torch.stack([window.sum(-1), entries.sum(-1), 1 - window.sum(-1) - entries.sum(-1)], dim=-1)
        torch.testing.assert_close(got, mass[f"blocks.{i}.attn.hook_attn_mass"].float(), rtol=1e-4, atol=1e-5)
    top = dense_attention_topk(model, ids)
    index_layers = ds.index_layer.values.tolist()
    for j, layer in enumerate(index_layers):
        p = rebuilt[layer][1].mean(dim=2).numpy()  # [B, S, N]
        for b in range(B):
            for s in range(S):
                seen = (s + 1) // 4
                order = sorted(range(seen), key=lambda w: (-p[b, s, w], w))[:k]
                assert top[b * S + s, j].tolist() == order + [-1] * (k - len(order))
    out = analysis.indexer_recall(ds, top)
    sel, pos = ds.index_selected.values, ds.pos.values
    for j in range(len(index_layers)):
        per = [len(set(sel[n, j][sel[n, j] >= 0]) & set(top[n, j][top[n, j] >= 0])) / (top[n, j] >= 0).sum()
               for n in range(len(pos)) if (top[n, j] >= 0).any()]
        choosing = [len(set(sel[n, j][sel[n, j] >= 0]) & set(top[n, j][top[n, j] >= 0])) / k
                    for n in range(len(pos)) if (pos[n] + 1) // 4 > k]
        np.testing.assert_allclose(out.recall.values[j], np.mean(choosing), rtol=1e-12)
        np.testing.assert_allclose(out.recall_all.values[j], np.mean(per), rtol=1e-12)
        assert int(out.queries.values[j]) == len(choosing) and 0 < out.recall.values[j] < 1
