"""The zarr store: round trips checked with plain zarr and xarray, commits, writers, versions, bad stores."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from trace_helpers import corpus, run_windows, write_store

from workbench.trace import (
    SchemaError,
    Trace,
    TraceStore,
    TraceStoreError,
    from_vllm_routed_experts,
    open_trace,
    to_vllm_routed_experts,
)

TEXTS = corpus(12, seed=3)


def in_memory(loaded, texts, sites=None):
    t = Trace(loaded.model, sites, tokenizer=loaded.tokenizer, checkpoint=loaded.digest)
    with t:
        for _ in run_windows(t, texts, loaded.tokenizer):
            pass
    return t.to_xarray()


def assert_same_trace(a: xr.Dataset, b: xr.Dataset) -> None:
    assert set(a.variables) - {"progress"} == set(b.variables) - {"progress"}
    for name in a.variables:
        if name == "progress":
            continue
        va, vb = np.asarray(a[name].values), np.asarray(b[name].values)
        if va.dtype.kind in "OTU" or vb.dtype.kind in "OTU":
            assert [str(x) for x in va] == [str(x) for x in vb], name
        else:
            np.testing.assert_array_equal(va, vb, err_msg=name)


def test_round_trip_through_our_reader_and_plain_zarr_and_xarray(tmp_path, loaded):
    sites = ["expert_ids", "expert_weights", "router_scores", "kv_latent", "kv_latent_norm"]
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS, sites, chunk_tokens=32)
    want = in_memory(loaded, TEXTS, sites)
    ours = open_trace(path)
    assert ours.attrs["complete"] and ours.expert_ids.chunks[0][0] == 32  # lazy and chunked along token
    assert_same_trace(ours.compute(), want)
    # readers we did not write
    plain = xr.open_zarr(path, consolidated=False)
    assert_same_trace(plain.drop_vars("progress").compute(), want)
    g = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(g["expert_ids"][:], want.expert_ids.values)
    assert g["router_scores"].dtype == np.float16 and g["expert_ids"].dtype == np.int16
    assert json.loads(g.attrs["model_config"])["n_routed_experts"] == loaded.model.config.n_routed_experts
    assert g.attrs["checkpoint"] == loaded.digest and g.attrs["schema_version"] == "1.0"


def test_uncommitted_rows_are_invisible_and_the_store_is_incomplete_until_closed(tmp_path, loaded):
    path = tmp_path / "t.zarr"
    store = write_store(path, loaded, TEXTS, close=False)
    # a killed batch: arrays written past the commit point, progress not bumped
    start = store.tokens
    store._ensure_capacity(start + 5)
    store._write("token_id", start, start + 5, np.full(5, 3, dtype=np.int32))
    ds = open_trace(path)
    assert not ds.attrs["complete"] and ds.sizes["token"] == store.tokens
    assert (ds.token_id.values != 3).any() or store.tokens == 0


def test_disk_full_mid_batch_keeps_every_committed_batch_and_resume_finishes(tmp_path, loaded, monkeypatch):
    path = tmp_path / "t.zarr"
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16)
    batches = []
    with t:
        batches = [(dict(b), n) for b, n in run_windows(t, TEXTS, loaded.tokenizer)]
    for b, n in batches[:2]:
        store.append(b, windows=n)
    committed = store.tokens
    real_write, calls = TraceStore._write, {"n": 0}

    def failing_write(self, name, start, end, data):
        calls["n"] += 1
        if calls["n"] == 3:  # a few arrays of the batch are on disk, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, start, end, data)

    monkeypatch.setattr(TraceStore, "_write", failing_write)
    with pytest.raises(OSError, match=f"disk is full.*keeps its {committed} committed tokens"):
        store.append(*batches[2])
    monkeypatch.setattr(TraceStore, "_write", real_write)
    ds = open_trace(path)
    assert ds.sizes["token"] == committed and not ds.attrs["complete"]
    # resume: a fresh handle continues after the committed batches
    again = TraceStore.open_for_append(path, t.attrs(), t.layout)
    assert again.tokens == committed and again.seqs == sum(n for _, n in batches[:2])
    for b, n in batches[2:]:
        again.append(b, windows=n)
    again.close()
    assert_same_trace(open_trace(path).compute(), in_memory(loaded, TEXTS))


def test_appending_another_models_trace_is_refused_and_nothing_changes(tmp_path, loaded):
    from workbench.model.transformer import DeepSeekModel

    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS, close=False)
    before = open_trace(path).compute()
    other = DeepSeekModel.random(loaded.model.config.replace(n_routed_experts=8, n_group=2, topk_group=1), seed=0)
    t = Trace(other, None, checkpoint="random:other")
    with pytest.raises(TraceStoreError, match="another model"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)
    t = Trace(loaded.model, None, checkpoint="sha256:feed")  # same shapes, other weights
    with pytest.raises(TraceStoreError, match="another checkpoint"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)
    t = Trace(loaded.model, ["router_scores"], checkpoint=loaded.digest)
    with pytest.raises(TraceStoreError, match="selection of sites"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)
    assert_same_trace(open_trace(path).compute(), before)


def test_schema_versions(tmp_path, loaded):
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS[:3])
    g = zarr.open_group(path, mode="r+")
    # a newer minor version adds a variable: we still read it, keeping the unknown variable
    g.attrs["schema_version"] = "1.4"
    n = g["token_id"].shape[0]
    extra = g.create_array("router_entropy", shape=(n,), dtype="float32", dimension_names=["token"])
    extra[:] = np.arange(n, dtype=np.float32)
    ds = open_trace(path)
    np.testing.assert_array_equal(ds.router_entropy.values, np.arange(n))
    g.attrs["schema_version"] = "2.0"
    with pytest.raises(SchemaError, match=r"schema 2\.0 cannot be read.*upgrade the workbench"):
        open_trace(path)
    t = Trace(loaded.model, None, checkpoint=loaded.digest)
    with pytest.raises(SchemaError, match=r"schema 2\.0"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)


def test_corrupt_and_partial_stores_give_clear_errors(tmp_path, loaded):
    with pytest.raises(FileNotFoundError, match="no trace store"):
        open_trace(tmp_path / "missing.zarr")
    garbled = tmp_path / "garbled.zarr"
    garbled.mkdir()
    (garbled / "zarr.json").write_text("{not json")
    with pytest.raises(TraceStoreError, match="not a readable zarr v3 trace store"):
        open_trace(garbled)
    bare = tmp_path / "bare.zarr"
    zarr.open_group(bare, mode="w")  # killed during create: a group without our attrs
    with pytest.raises(TraceStoreError, match="killed while being created"):
        open_trace(bare)
    holed = tmp_path / "holed.zarr"
    write_store(holed, loaded, TEXTS[:3])
    import shutil

    shutil.rmtree(holed / "expert_ids")
    with pytest.raises(TraceStoreError, match=r"partial store: arrays \['expert_ids'\]"):
        open_trace(holed)
    with pytest.raises(TraceStoreError, match="already exists"):
        write_store(holed, loaded, TEXTS[:3])


_WRITER = """
import sys
from workbench.loader import load_model
from workbench.trace import Trace, TraceStore
sys.path.insert(0, {tests!r})
from trace_helpers import corpus, run_windows
w = int(sys.argv[1])
loaded = load_model()
t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
store = TraceStore.open_for_append({path!r}, t.attrs(), t.layout, writer=w)
with t:
    for batch, n in run_windows(t, corpus(6, seed=10 + w), loaded.tokenizer, seq0=1000 * w):
        store.append(batch, windows=n)
store.close()
"""


def test_two_processes_fill_disjoint_regions(tmp_path, loaded):
    path = tmp_path / "t.zarr"
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, checkpoint=loaded.digest)
    TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, writers=2, region_tokens=1024)
    code = _WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)]) for w in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ds = open_trace(path)
    assert ds.attrs["complete"]
    want = [in_memory(loaded, corpus(6, seed=10 + w)) for w in (0, 1)]
    np.testing.assert_array_equal(ds.token_id.values, np.concatenate([w.token_id.values for w in want]))
    np.testing.assert_array_equal(ds.expert_ids.values, np.concatenate([w.expert_ids.values for w in want]))
    assert set(np.unique(ds.seq.values) // 1000) == {0, 1}


def test_vllm_routed_experts_round_trip(loaded):
    ds = in_memory(loaded, TEXTS[:4])
    routed = to_vllm_routed_experts(ds)
    cfg = loaded.model.config
    assert routed.dtype == np.int16 and routed.shape == (ds.sizes["token"], len(cfg.moe_layers), cfg.num_experts_per_tok)
    back = from_vllm_routed_experts(routed, moe_layers=cfg.moe_layers, token_ids=ds.token_id.values,
                                    n_experts=cfg.n_routed_experts)
    np.testing.assert_array_equal(back.expert_ids.values, ds.expert_ids.values)
    assert list(back.layer.values) == list(cfg.moe_layers)
    partial = in_memory(loaded, TEXTS[:2], ["blocks.1.mlp.hook_expert_indices"])
    with pytest.raises(ValueError, match=r"layers \[2\] were not captured"):
        to_vllm_routed_experts(partial)
    with pytest.raises(ValueError, match="tokens, moe_layers, top_k"):
        from_vllm_routed_experts(routed[0])
