"""Traces of V3.2 and V4 models (schema 1.2): the indexer's selections and scores, V4's attention-mass split and mHC
matrices, the per-layer coords, the store round trip with resume, `workbench trace` on a V4 checkpoint, and V3
layouts left exactly as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench.cli import main
from workbench.trace import Layout, SchemaError, Trace, TraceStore, open_trace
from workbench.trace.schema import BASE_VERSION, SCHEMA_VERSION


@pytest.fixture(scope="module")
def v4() -> wb.DeepSeekModel:
    return wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4"), seed=1)


@pytest.fixture(scope="module")
def v32() -> wb.DeepSeekModel:
    cfg = wb.ModelConfig.from_name("tiny").replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16,
                                                   index_topk=8)
    return wb.DeepSeekModel.random(cfg, seed=2)


def _ids(model: wb.DeepSeekModel, B: int, S: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g)


def _probe_values(model: wb.DeepSeekModel, ids: torch.Tensor, pattern: list[str]) -> dict[str, torch.Tensor]:
    """What the probe sites give on a plain forward, listened to directly."""
    got: dict[str, torch.Tensor] = {}
    with model.probes.listen(pattern, lambda n, v: got.__setitem__(n, v.detach().clone()) or None), torch.no_grad():
        model(ids)
    return got


def test_v4_trace_holds_the_probe_values(v4):
    cfg = v4.config
    ids = _ids(v4, 2, 40)
    with wb.trace(v4, sites=["all"]) as t:
        v4(ids)
    ds = t.to_xarray()
    probes = _probe_values(v4, ids, ["blocks.*.attn.hook_index_*", "blocks.*.attn.hook_attn_mass", "blocks.*.hc_*"])
    assert ds.attrs["schema_version"] == SCHEMA_VERSION == "1.2"
    index_layers = [i for i in range(cfg.num_hidden_layers) if cfg.compress_ratio(i) == 4]  # CSA layers only
    assert ds["index_layer"].values.tolist() == index_layers and ds.sizes["index_k"] == cfg.index_topk
    assert ds["attn_kind"].values.tolist() == [cfg.attention_kind(i) for i in range(cfg.num_hidden_layers)]
    assert ds["compress_ratio"].values.tolist() == list(cfg.compress_ratios)
    assert ds["hash_routed"].values.tolist() == [i < cfg.num_hash_layers for i in cfg.moe_layers]
    assert ds["branch"].values.tolist() == ["window", "compressed", "sink"]
    for j, layer in enumerate(index_layers):
        sel = probes[f"blocks.{layer}.attn.hook_index_selected"].reshape(80, -1)
        np.testing.assert_array_equal(ds.index_selected.values[:, j], sel.numpy())
        scores = probes[f"blocks.{layer}.attn.hook_index_scores"].reshape(80, -1)
        want = np.where(sel >= 0, scores.gather(1, sel.clamp(min=0)).numpy(), np.nan)
        np.testing.assert_array_equal(ds.index_scores.values[:, j], want)
    assert (ds.index_selected.values >= 0).any() and (ds.index_selected.values == -1).any()
    for layer in range(cfg.num_hidden_layers):
        mass = probes[f"blocks.{layer}.attn.hook_attn_mass"].reshape(80, cfg.num_attention_heads, 3)
        np.testing.assert_array_equal(ds.attn_mass.values[:, layer], mass.numpy())
        for s, site in enumerate(("hc_attn", "hc_ffn")):
            mix = probes[f"blocks.{layer}.{site}.hook_mix"].reshape(80, cfg.hc_mult, cfg.hc_mult)
            np.testing.assert_array_equal(ds.hc_mix.values[:, layer, s], mix.numpy())
    np.testing.assert_allclose(ds.attn_mass.sum("branch").values, 1.0, rtol=1e-5)
    window_only = [i for i in range(cfg.num_hidden_layers) if cfg.compress_ratio(i) == 0]
    assert (ds.attn_mass.sel(branch="compressed").values[:, window_only] == 0).all()


def test_v4_default_sites_and_padding(v4):
    ids = _ids(v4, 2, 24, seed=3)
    with wb.trace(v4) as t:
        batch = t.forward(ids, lengths=[24, 17])
    assert t.layout.variables == ("expert_ids", "expert_weights", "index_selected", "attn_mass")
    assert len(batch["token_id"]) == 41 and batch["index_selected"].shape == (41, 2, v4.config.index_topk)
    with wb.trace(v4) as alone:
        short = alone.forward(ids[1:, :17])
    for name in ("index_selected", "attn_mass", "expert_ids"):  # pads are causal: the real tokens are unchanged
        np.testing.assert_allclose(batch[name][24:], short[name], rtol=1e-5, atol=1e-6)


def test_a_window_shorter_than_one_compressed_entry_records_nothing_kept(v4):
    """Three tokens: no CSA entry is complete yet, so the selection is all -1 and its scores all NaN (not a crash)."""
    ids = _ids(v4, 1, 3, seed=5)
    with wb.trace(v4, sites=["all"]) as t:
        batch = t.forward(ids)
    assert (batch["index_selected"] == -1).all() and np.isnan(batch["index_scores"]).all()
    assert batch["index_scores"].shape == batch["index_selected"].shape == (3, 2, v4.config.index_topk)


def test_v32_selection_is_padded_to_index_topk(v32):
    k = v32.config.index_topk
    for S in (5, 12):  # fewer keys than index_topk, then more
        ids = _ids(v32, 2, S, seed=S)
        with wb.trace(v32, sites=["index_selected", "index_scores"]) as t:
            v32(ids)
        ds = t.to_xarray()
        assert ds["attn_kind"].values.tolist() == ["indexed_attention"] * v32.config.num_hidden_layers
        assert ds["index_layer"].values.tolist() == list(range(v32.config.num_hidden_layers))
        assert ds["compress_ratio"].values.tolist() == [0] * v32.config.num_hidden_layers
        sel, pos = ds.index_selected.values, ds.pos.values
        assert sel.shape == (2 * S, v32.config.num_hidden_layers, k)
        kept = (sel >= 0).sum(axis=2)
        np.testing.assert_array_equal(kept, np.minimum(pos + 1, k)[:, None].repeat(sel.shape[1], 1))
        assert ((sel <= pos[:, None, None]) | (sel == -1)).all()
        for row in sel.reshape(-1, k):  # every causal key once at most
            valid = row[row >= 0]
            assert len(set(valid.tolist())) == len(valid)
        assert np.isnan(ds.index_scores.values[sel < 0]).all() and not np.isnan(ds.index_scores.values[sel >= 0]).any()
    # listening keeps V3.2's output: index_topk >= T runs dense either way
    ids = _ids(v32, 1, 6)
    with torch.no_grad():
        plain = v32(ids)
        with wb.trace(v32, sites=["index_selected"]):
            traced = v32(ids)
    assert torch.equal(plain, traced)


def test_v4_store_round_trip_and_resume(v4, tmp_path):
    path = tmp_path / "v4.zarr"
    windows = [_ids(v4, 2, 20, seed=s) for s in range(4)]
    t = Trace(v4, ["all"], keep=True)
    store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
    with t:
        for w in windows[:2]:
            store.append(t.forward(w), 2)
    store.close(complete=False)  # stopped early: resume from the last commit
    partial = open_trace(path)
    assert partial.attrs["complete"] is False and partial.attrs["schema_version"] == "1.2"
    store = TraceStore.open_for_append(path, t.attrs(), t.layout)
    with t:
        for w in windows[2:]:
            store.append(t.forward(w, seq=range(store.seqs + store.pending_seqs,
                                                store.seqs + store.pending_seqs + 2)), 2)
    store.close()
    ds, want = open_trace(path), t.to_xarray()
    assert ds.attrs["complete"] is True
    for name in ("index_selected", "index_scores", "attn_mass", "hc_mix", "expert_ids", "token_id", "seq"):
        np.testing.assert_array_equal(ds[name].values, want[name].values)
    for coord in ("attn_kind", "compress_ratio", "hash_routed", "index_layer", "hc_site", "branch"):
        assert ds[coord].values.tolist() == want[coord].values.tolist()
    assert Layout.from_json(json.loads(ds.attrs["layout"])) == t.layout
    plain = xr.open_zarr(path, consolidated=False)  # a finished single-writer store reads without us
    np.testing.assert_array_equal(plain.index_selected.values, want.index_selected.values)


def test_trace_command_on_a_v4_checkpoint(v4, tmp_path):
    wb.save_checkpoint(v4, tmp_path / "ck")
    (tmp_path / "in.txt").write_text("the expert routes a token\nwhile loss falls and weights scale the token\n")
    assert main(["trace", "--no-progress", "--model", str(tmp_path / "ck"), "--input", str(tmp_path / "in.txt"),
                 "--out", str(tmp_path / "o.zarr"), "--sites", "index_selected", "attn_mass", "hc_mix",
                 "--chunk-tokens", "8"]) == 0
    ds = open_trace(tmp_path / "o.zarr")
    assert set(ds.data_vars) >= {"index_selected", "attn_mass", "hc_mix", "logprob"}
    assert ds.attrs["schema_version"] == "1.2" and ds.sizes["index_layer"] == 2
    loaded = wb.load_model(str(tmp_path / "ck"))
    for seq in np.unique(ds.seq.values):  # the recorded values are those of the loaded model on each window
        part = ds.isel(token=np.nonzero(ds.seq.values == seq)[0])
        ids = torch.tensor(part.token_id.values, dtype=torch.long)[None]
        got = _probe_values(loaded.model, ids, ["blocks.1.attn.hook_index_selected", "blocks.2.attn.hook_attn_mass"])
        np.testing.assert_array_equal(part.index_selected.values[:, 0], got["blocks.1.attn.hook_index_selected"][0])
        np.testing.assert_allclose(part.attn_mass.values[:, 2], got["blocks.2.attn.hook_attn_mass"][0], atol=1e-6)  # batched


def test_v3_layouts_stay_schema_1_1():
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny"))
    t = Trace(model)
    assert t.layout.variables == ("expert_ids", "expert_weights", "kv_latent_norm")
    assert set(t.layout.to_json()) == {"variables", "layers", "n_layers", "top_k", "n_experts", "latent", "fp8_sites"}
    assert t.attrs()["schema_version"] == BASE_VERSION == "1.1"
    assert set(t.layout.axis_coords()) == {"layer", "layer_all"}
    with pytest.raises(KeyError, match="no probe site in this model feeds 'attn_mass'"):
        Trace(model, ["attn_mass"])


def test_a_bad_1_2_layout_is_refused(v4):
    good = Trace(v4).layout.to_json()
    for change in ({"attn_kinds": ["sliding_attention"]}, {"index_layers": [9]}, {"hash_layers": [7]},
                   {"hc_mult": -1}, {"index_topk": "x"}):
        with pytest.raises(SchemaError, match="trace layout"):
            Layout.from_json({**good, **change})
