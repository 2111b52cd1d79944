"""Trace stores on object storage (moto's S3 server on 127.0.0.1): the same trace as on disk, crash safety without
rename, one winner between two creators and between two attempts of one region, readers during a run."""

from __future__ import annotations

import json
import threading

import fsspec.implementations.memory
import numcodecs
import numpy as np
import pytest
import xarray as xr
from trace_helpers import assert_same_trace, corpus, run_windows, write_store

from workbench.cli import main
from workbench.trace import Trace, TraceStore, open_trace
from workbench.trace.storage import ClaimedError, ObjectStorage, SupersededError, storage_for

TEXTS = corpus(24, seed=11)


def _trace(loaded):
    return Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)


def _batches(loaded, t, texts=TEXTS):
    with t:
        return [(dict(b), n) for b, n in run_windows(t, texts, loaded.tokenizer)]


def test_a_cli_trace_into_s3_equals_the_same_trace_on_disk(tmp_path, s3):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    url = s3.url("cli")
    flags = ["trace", "--model", "default-v3", "--input", str(src), "--batch-tokens", "64", "--chunk-tokens", "32",
             "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "disk.zarr")]) == 0
    assert main([*flags, "--out", url, "--storage-options", json.dumps(s3.options)]) == 0
    remote = open_trace(url, storage_options=s3.options)
    assert remote.attrs["complete"] and remote.sizes["token"] > 100
    assert_same_trace(remote.compute(), open_trace(tmp_path / "disk.zarr").compute())
    keys = s3.keys(url)
    assert not [k for k in keys if k.endswith(".partial")]  # one PUT per object: nothing temporary, nothing renamed
    assert "expert_ids/zarr.json" in keys and "progress/c/0/0" in keys
    # a finished single-writer store on S3 is plain zarr: xarray + s3fs read it without the workbench
    plain = xr.open_zarr(url, consolidated=False, storage_options={
        "endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
    np.testing.assert_array_equal(plain.expert_ids.values, remote.expert_ids.values)
    # the same URL again is refused, not overwritten
    assert main([*flags, "--out", url, "--storage-options", json.dumps(s3.options)]) == 2


def test_a_crash_mid_flush_on_s3_keeps_every_commit_and_resume_finishes_equal(tmp_path, s3, loaded, monkeypatch):
    t = _trace(loaded)
    batches = _batches(loaded, t)
    url = s3.url("crash")
    store = TraceStore.create(url, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab(), storage_options=s3.options)
    for b, n in batches[:3]:
        store.append(b, windows=n)
    committed = store.tokens
    assert committed > 0
    real_put, calls = ObjectStorage.put, {"n": 0}

    def dying_put(self, key, payload):
        calls["n"] += 1
        if calls["n"] == 3:  # a few chunks of the flush are PUT, then the process "dies"
            raise OSError(5, "connection reset")
        return real_put(self, key, payload)

    monkeypatch.setattr(ObjectStorage, "put", dying_put)
    store.flush_tokens = 10 ** 6  # buffer the rest, then one flush that dies part way
    for b, n in batches[3:]:
        store.append(b, windows=n)
    with pytest.raises(OSError, match=f"keeps its {committed} committed tokens"):
        store.flush()
    monkeypatch.setattr(ObjectStorage, "put", real_put)
    store.release()
    seen = open_trace(url, storage_options=s3.options)
    assert seen.sizes["token"] == committed and not seen.attrs["complete"]  # stray chunks past the commit unseen
    again = TraceStore.open_for_append(url, t.attrs(), t.layout, storage_options=s3.options)
    assert again.tokens == committed
    done_windows = again.seqs
    rest = [(b, n) for b, n in batches]
    skipped = 0
    for b, n in rest:  # resume after the committed windows, as the command does
        if skipped < done_windows:
            skipped += n
            continue
        again.append(b, windows=n)
    again.close()
    reference = write_store(tmp_path / "ref.zarr", loaded, TEXTS, chunk_tokens=16)
    assert reference.tokens == again.tokens
    assert_same_trace(open_trace(url, storage_options=s3.options).compute(), open_trace(tmp_path / "ref.zarr").compute())


def test_two_attempts_of_one_region_leave_exactly_one_commit_the_other_is_superseded(s3, loaded):
    t = _trace(loaded)
    batches = _batches(loaded, t)
    url = s3.url("zombie")
    TraceStore.create(url, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab(), writers=2, region_tokens=1024,
                      storage_options=s3.options).release()
    first = TraceStore.open_for_append(url, t.attrs(), t.layout, writer=1, storage_options=s3.options)
    zombie = TraceStore.open_for_append(url, t.attrs(), t.layout, writer=1, flush_tokens=10 ** 6,
                                        storage_options=s3.options)
    for b, n in batches[:2]:
        first.append(b, windows=n)
    first.flush()
    winner = first.tokens
    zombie.append(*batches[0])
    with pytest.raises(SupersededError, match="committed by another attempt"):
        zombie.flush()  # its read of the row is older than first's commit: the If-Match PUT is refused
    zombie.release()
    for b, n in batches[2:]:
        first.append(b, windows=n)
    first.close(finalize=False)
    row = np.asarray(open_trace(url, storage_options=s3.options).attrs["committed_tokens"])
    assert int(row) == first.tokens > winner


def test_concurrent_attempts_never_move_the_committed_count_backwards(s3, loaded):
    t = _trace(loaded)
    batches = _batches(loaded, t)
    url = s3.url("race")
    TraceStore.create(url, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab(), writers=1, storage_options=s3.options
                      ).release()
    outcomes: list[str] = []
    seen: list[int] = []
    stop = threading.Event()

    def attempt() -> None:
        try:
            store = TraceStore.open_for_append(url, t.attrs(), t.layout, flush_tokens=1, storage_options=s3.options)
        except Exception as e:  # the other attempt finished first
            outcomes.append(type(e).__name__)
            return
        try:
            for b, n in batches[store.seqs // 3:]:
                store.append(b, windows=n)
            store.close(finalize=False)
            outcomes.append("done")
        except SupersededError:
            store.release()
            outcomes.append("superseded")

    def sample() -> None:
        storage = storage_for(url, s3.options)
        while not stop.is_set():
            payload = storage.get("progress/c/0/0")  # absent until the first commit (zarr skips fill chunks)
            seen.append(0 if payload is None else int(np.frombuffer(numcodecs.Zstd().decode(payload), "<i8")[0]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=attempt) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    sampler.join()
    assert outcomes.count("done") >= 1 and set(outcomes) <= {"done", "superseded", "AlreadyFinishedError"}
    assert len(seen) > 5 and seen == sorted(seen) and seen[-1] > 0  # sampled throughout; never regresses
    total = sum(len(b["token_id"]) for b, _ in batches)
    assert open_trace(url, storage_options=s3.options).attrs["committed_tokens"] == total


def test_two_creators_of_one_url_one_wins_the_other_is_told_who(s3, loaded):
    t = _trace(loaded)
    url = s3.url("create")
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def create(run_id: str) -> None:
        barrier.wait()
        try:
            results[run_id] = TraceStore.create(url, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab(),
                                                storage_options=s3.options, run_id=run_id)
        except ClaimedError as e:
            results[run_id] = e

    threads = [threading.Thread(target=create, args=(r,)) for r in ("driver-A", "driver-B")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    won = [r for r, v in results.items() if isinstance(v, TraceStore)]
    lost = [r for r, v in results.items() if isinstance(v, ClaimedError)]
    assert len(won) == 1 and len(lost) == 1
    assert f"claimed by another run ({won[0]})" in str(results[lost[0]])
    results[won[0]].release()  # type: ignore[union-attr]


def test_a_reader_during_a_run_sees_committed_rows_only(s3, loaded):
    t = _trace(loaded)
    batches = _batches(loaded, t)
    url = s3.url("reader")
    store = TraceStore.create(url, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab(), flush_tokens=10 ** 6,
                              storage_options=s3.options)
    store.append(*batches[0])  # buffered, not committed
    early = open_trace(url, storage_options=s3.options)
    assert early.sizes["token"] == 0 and not early.attrs["complete"]
    store.flush()
    mid = open_trace(url, storage_options=s3.options, chunks="auto")
    assert mid.sizes["token"] == store.tokens and not mid.attrs["complete"]
    np.testing.assert_array_equal(mid.token_id.values, batches[0][0]["token_id"])
    store.close()
    assert open_trace(url, storage_options=s3.options).attrs["complete"]


def test_storage_options_are_refused_for_a_local_path_and_bad_urls_say_why(tmp_path):
    with pytest.raises(ValueError, match="storage_options apply to object-store URLs"):
        storage_for(tmp_path / "x.zarr", {"endpoint_url": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="cannot open nosuch://bucket/x.zarr"):
        storage_for("nosuch://bucket/x.zarr")
    with pytest.raises(FileNotFoundError, match="no trace store at memory:///absent.zarr"):
        open_trace("memory:///absent.zarr")


def test_open_trace_auto_chunks_merge_whole_stored_chunks(tmp_path, loaded):
    write_store(tmp_path / "t.zarr", loaded, corpus(60, seed=2), chunk_tokens=16)
    stored = open_trace(tmp_path / "t.zarr")
    n = stored.sizes["token"]
    assert stored.expert_ids.data.numblocks[0] == -(-n // 16)
    merged = open_trace(tmp_path / "t.zarr", chunks=40)  # rounded up to whole stored chunks: 48
    assert merged.expert_ids.data.chunks[0][0] == 48
    auto = open_trace(tmp_path / "t.zarr", chunks="auto")
    assert auto.expert_ids.data.numblocks[0] == 1  # ~128 MiB per chunk: this whole small trace
    assert_same_trace(auto.compute(), stored.compute())
    with pytest.raises(ValueError, match="chunks must be None, 'auto' or a positive int"):
        open_trace(tmp_path / "t.zarr", chunks=0)


class _Memory(fsspec.implementations.memory.MemoryFileSystem):
    """fsspec's in-memory filesystem under a protocol obstore does not know: the fsspec path of any URL."""

    protocol = ("wbmem",)


def test_any_other_fsspec_url_holds_the_same_trace(tmp_path, loaded):
    fsspec.register_implementation("wbmem", _Memory, clobber=True)
    url = f"wbmem://traces/{tmp_path.name}.zarr"
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    flags = ["trace", "--model", "default-v3", "--input", str(src), "--batch-tokens", "64", "--chunk-tokens", "32",
             "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "disk.zarr")]) == 0
    assert main([*flags, "--out", url]) == 0
    assert type(storage_for(url)).__name__ == "FsspecStorage"
    got = open_trace(url, chunks="auto")
    assert got.attrs["complete"]
    assert_same_trace(got.compute(), open_trace(tmp_path / "disk.zarr").compute())
    assert main([*flags, "--out", url]) == 2  # exists: refused, not overwritten
    assert main(["trace-status", url]) == 0
