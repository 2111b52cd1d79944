"""The store writer: round trips checked with plain zarr and xarray, commits, trims, several writers, refusals."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from trace_helpers import assert_same_trace, corpus, in_memory, run_windows, write_store

from workbench.trace import (
    Trace,
    TraceStore,
    TraceStoreError,
    open_trace,
)
from workbench.trace.writer_lock import WriterLock
from workbench.trace.zarr_io import STORE_ATTRS

TEXTS = corpus(12, seed=3)


def test_round_trip_through_our_reader_and_plain_zarr_and_xarray(tmp_path, loaded):
    sites = ["expert_ids", "expert_weights", "router_scores", "kv_latent", "kv_latent_norm"]
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS, sites, chunk_tokens=32)
    want = in_memory(loaded, TEXTS, sites)
    ours = open_trace(path)
    assert ours.attrs["complete"] and ours.expert_ids.chunks[0][0] == 32  # lazy and chunked along token
    assert_same_trace(ours.compute(), want)
    # readers we did not write: schema 1.1 keeps text once per token id, in `vocab_text`
    plain = xr.open_zarr(path, consolidated=False)
    assert_same_trace(plain.drop_vars(["progress", "vocab_text"]).compute(), want.drop_vars("text"))
    assert list(plain.vocab_text.values[want.token_id.values]) == list(want.text.values)
    g = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(g["expert_ids"][:], want.expert_ids.values)
    assert g["router_scores"].dtype == np.float16 and g["expert_ids"].dtype == np.int16
    assert json.loads(g.attrs["model_config"])["n_routed_experts"] == loaded.model.config.n_routed_experts
    assert g.attrs["checkpoint"] == loaded.digest and g.attrs["schema_version"] == "1.1"


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


def test_closing_trims_the_capacity_and_drops_chunks_a_killed_batch_left_past_the_end(tmp_path, loaded):
    """A single writer's arrays are over-allocated (metadata only) and trimmed on close; a chunk written past the
    final end by a killed, never-committed batch must not survive the trim as an orphan file."""
    path = tmp_path / "t.zarr"
    store = write_store(path, loaded, TEXTS, close=False)
    assert store.arrays["token_id"].shape[0] >= 64 * store.chunk_tokens > store.tokens  # room without resizes
    stale = 40 * store.chunk_tokens  # a chunk index well past anything this run commits
    store._write("expert_ids", stale, stale + 3, np.ones((3, *store.arrays["expert_ids"].shape[1:]), np.int16))
    assert (path / "expert_ids" / "c" / "40").exists()
    store.close()
    g = zarr.open_group(path, mode="r")
    assert g["expert_ids"].shape[0] == g["token_id"].shape[0] == store.tokens
    assert not (path / "expert_ids" / "c" / "40").exists()
    kept = sorted(int(e) for e in os.listdir(path / "expert_ids" / "c"))
    assert kept == list(range(-(-store.tokens // store.chunk_tokens)))
    assert open_trace(path).attrs["complete"]


def test_disk_full_mid_batch_keeps_every_committed_batch_and_resume_finishes(tmp_path, loaded, monkeypatch):
    path = tmp_path / "t.zarr"
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
    batches = []
    with t:
        batches = [(dict(b), n) for b, n in run_windows(t, TEXTS, loaded.tokenizer)]
    for b, n in batches[:2]:
        store.append(b, windows=n)
    committed = store.tokens
    real_put, calls = TraceStore._put, {"n": 0}

    def failing_put(self, key, payload):
        calls["n"] += 1
        if calls["n"] == 3:  # a few chunk files of the flush are on disk, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, key, payload)

    monkeypatch.setattr(TraceStore, "_put", failing_put)
    with pytest.raises(OSError, match=f"disk is full.*keeps its {committed} committed tokens"):
        store.append(*batches[2])
    assert calls["n"] > 3  # the other writes of the flush ran (and stopped) before the error was raised
    monkeypatch.setattr(TraceStore, "_put", real_put)
    ds = open_trace(path)
    assert ds.sizes["token"] == committed and not ds.attrs["complete"]
    # resume: a fresh handle continues after the committed batches, once the failed one let go of the region
    with pytest.raises(TraceStoreError, match="another writer holds it"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)
    store.release()
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


def _chunk_files(path: Path) -> int:
    return sum(1 for p in path.rglob("c/*") if p.is_file()) + sum(1 for p in path.rglob("c/*/*") if p.is_file())


def test_buffered_concurrent_flushes_equal_the_plain_write_per_batch(tmp_path, loaded):
    """The fast path (batches buffered to whole chunks, all arrays written at once) against the plain one (every
    batch written at once, array by array): identical zarr arrays, fewer chunk writes; a reopened store with a
    partly filled last chunk continues exactly."""
    t = Trace(loaded.model, ["all"], tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    with t:
        batches = [(dict(b), n) for b, n in run_windows(t, corpus(30, seed=4), loaded.tokenizer)]
    fast = TraceStore.create(tmp_path / "fast.zarr", t.attrs(), t.layout, chunk_tokens=128, vocab=t.vocab())
    plain = TraceStore.create(tmp_path / "plain.zarr", t.attrs(), t.layout, chunk_tokens=64, vocab=t.vocab(),
                              flush_tokens=1)
    plain._sync_writes = True
    half = len(batches) // 2
    for b, n in batches[:half]:
        fast.append(b, windows=n)
        plain.append(b, windows=n)
    assert plain.pending_tokens == 0 and (fast.pending_tokens > 0 or fast.tokens % 128 != 0)
    fast.close(complete=False)  # commits what is buffered, leaves the store open for a resume
    fast = TraceStore.open_for_append(tmp_path / "fast.zarr", t.attrs(), t.layout)
    assert fast.tokens == plain.tokens and fast.seqs == plain.seqs
    for b, n in batches[half:]:
        fast.append(b, windows=n)
        plain.append(b, windows=n)
    fast.close()
    plain.close()
    a, b = zarr.open_group(tmp_path / "fast.zarr", mode="r"), zarr.open_group(tmp_path / "plain.zarr", mode="r")
    for name in (*t.layout.stored_names(), "progress"):  # progress: the direct commit vs zarr's setitem
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert_same_trace(open_trace(tmp_path / "fast.zarr").compute(), open_trace(tmp_path / "plain.zarr").compute())
    assert "text" not in a and list(a["vocab_text"][:][a["token_id"][:]]) == list(open_trace(tmp_path / "fast.zarr").text.values)


_WRITER = """
import sys
from workbench.loader import load_model
from workbench.trace import Trace, TraceStore
sys.path.insert(0, {tests!r})
from trace_helpers import corpus, run_windows
w = int(sys.argv[1])
loaded = load_model("default-v3")
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


# ---------------------------------------------------------------------- the writer lock
def test_one_handle_per_writer_region_and_regions_of_other_writers_run_together(tmp_path, loaded):
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    single = tmp_path / "one.zarr"
    store = TraceStore.create(single, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
    for second in (lambda: TraceStore.open_for_append(single, t.attrs(), t.layout),
                   lambda: TraceStore.create(single, t.attrs(), t.layout, chunk_tokens=16)):
        with pytest.raises(TraceStoreError, match=rf"{single}: another writer holds it .*another TraceStore handle in "
                                                  "this process: close it first"):
            second()
    store.close(complete=False)
    again = TraceStore.open_for_append(single, t.attrs(), t.layout)  # closing let go of the region
    again.close(complete=False)
    # flock locks belong to an open file, so two in one process exclude each other as two processes do
    first = WriterLock(single, 0)
    with pytest.raises(TraceStoreError, match="another writer holds it"):
        WriterLock(single, 0)
    first.release()
    WriterLock(single, 0).release()
    # writers of different regions (--shard I/N) take different locks
    many = tmp_path / "many.zarr"
    TraceStore.create(many, t.attrs(), t.layout, chunk_tokens=16, writers=2, region_tokens=64).close(complete=False)
    w0 = TraceStore.open_for_append(many, t.attrs(), t.layout, writer=0)
    w1 = TraceStore.open_for_append(many, t.attrs(), t.layout, writer=1)
    with pytest.raises(TraceStoreError, match="writer 1's lock"):
        TraceStore.open_for_append(many, t.attrs(), t.layout, writer=1)
    w0.close()
    w1.close()
    # the lock files sit where zarr and xarray never look: no warning about unknown objects
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "progress" in dict(zarr.open_group(single, mode="r").members())
        xr.open_zarr(single, consolidated=False)
        assert open_trace(many).attrs["complete"]


def test_reopening_one_region_keeps_the_temporary_files_other_writers_are_writing(tmp_path, loaded):
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    path = tmp_path / "t.zarr"
    TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, writers=2, region_tokens=64).close(complete=False)
    theirs = [path / "token_id" / "c" / "0.1.2.partial", path / "expert_ids" / "c" / "3" / "0.1.2.partial",
              path / "progress" / "c" / "0" / "0.1.2.partial"]  # writer 0: chunks 0..3, progress row 0
    ours = [path / "token_id" / "c" / "4.1.2.partial", path / "expert_ids" / "c" / "7" / "0.1.2.partial",
            path / "progress" / "c" / "1" / "0.1.2.partial"]  # writer 1: chunks 4..7, progress row 1
    for f in (*theirs, *ours):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a chunk")
    TraceStore.open_for_append(path, t.attrs(), t.layout, writer=1).close(complete=False)
    assert all(f.exists() for f in theirs) and not any(f.exists() for f in ours)
    single = tmp_path / "one.zarr"
    write_store(single, loaded, TEXTS[:2], close=False)
    leftover = single / "token_id" / "c" / "9.1.2.partial"
    leftover.write_bytes(b"x")
    TraceStore.open_for_append(single, t.attrs(), t.layout).close(complete=False)
    assert not leftover.exists()  # a single writer owns every file


def test_a_create_that_fails_removes_what_it_wrote_and_a_rerun_creates_it(tmp_path, loaded, monkeypatch):
    import zarr.storage._local as local

    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    real = local._put
    calls = {"n": 0}

    def full_disk(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, value, exclusive=exclusive)

    made_here, users_dir = tmp_path / "new" / "t.zarr", tmp_path / "empty.zarr"
    users_dir.mkdir()
    for path in (made_here, users_dir):
        calls["n"] = 0
        monkeypatch.setattr(local, "_put", full_disk)
        with pytest.raises(TraceStoreError, match=rf"creating {path} failed \(the disk is full\); removed what was "
                                                  "written"):
            TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
        monkeypatch.setattr(local, "_put", real)
        if path == made_here:
            assert not path.exists()
        else:  # a folder the user made stays, empty but for the lock file
            assert [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()] == ["progress/writer-0.lock"]
        TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab()).close()
        assert open_trace(path).attrs["complete"]
    (tmp_path / "file.zarr").write_text("notes")
    with pytest.raises(TraceStoreError, match="is a file, not a trace store folder"):
        TraceStore.create(tmp_path / "file.zarr", t.attrs(), t.layout)
    with pytest.raises(TraceStoreError, match="is a file, not a trace store"):
        open_trace(tmp_path / "file.zarr")


def test_every_root_metadata_a_joining_shard_can_read_has_all_the_attrs_or_none(tmp_path, loaded, monkeypatch):
    """A shard joining a store polls the root zarr.json while another shard creates it; each version of that file
    on disk must hold every store attr or none (attrs.update wrote it once per key: a joiner saw "writers" without
    "region_tokens" and failed)."""
    import zarr.storage._local as local

    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    path, real, seen = tmp_path / "t.zarr", local._put, []

    def record(file, value, exclusive=False):
        if Path(file) == path / "zarr.json":
            seen.append(set(json.loads(bytes(value.to_bytes()))["attributes"]))
        return real(file, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", record)
    TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, writers=2, region_tokens=64, vocab=t.vocab()).close()
    assert seen and all(not (keys & set(STORE_ATTRS)) or set(STORE_ATTRS) <= keys for keys in seen), seen
    assert set(STORE_ATTRS) <= seen[-1]


def test_discard_removes_only_a_store_this_handle_created_without_commits(tmp_path, loaded):
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    path = tmp_path / "t.zarr"
    assert TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16).discard() and not path.exists()
    write_store(path, loaded, TEXTS[:2], close=False)
    reopened = TraceStore.open_for_append(path, t.attrs(), t.layout)
    assert not reopened.discard() and path.exists()  # not created by this handle
    committed = TraceStore.create(tmp_path / "c.zarr", t.attrs(), t.layout, chunk_tokens=16, flush_tokens=1)
    with t:
        for batch, n in run_windows(t, TEXTS[:1], loaded.tokenizer):
            committed.append(batch, windows=n)
    assert not committed.discard() and open_trace(tmp_path / "c.zarr").sizes["token"] == committed.tokens > 0
