"""Reading stores: every schema version, migration 1.0 -> 1.1, newer versions, corrupt and partial stores."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from trace_helpers import assert_same_trace, corpus, in_memory, run_windows, write_store

from workbench.trace import SchemaError, Trace, TraceStore, TraceStoreError, migrate_store, open_trace

TEXTS = corpus(12, seed=3)


def _as_schema_1_0(path: Path) -> None:
    """Rewrite a store in the 1.0 layout (what workbench 0.1's writer produced): per-token `text`, no vocab table."""
    g = zarr.open_group(path, mode="r+")
    text = np.asarray(g["vocab_text"][:], dtype=object)[g["token_id"][:]]
    arr = g.create_array("text", shape=text.shape, chunks=g["token_id"].chunks, dtype=str, fill_value="",
                         dimension_names=["token"])
    arr[:] = text
    del g["vocab_text"]
    g.attrs["schema_version"] = "1.0"


def test_stores_of_each_schema_version(tmp_path, loaded):
    want = in_memory(loaded, TEXTS[:4])
    old = tmp_path / "old.zarr"
    write_store(old, loaded, TEXTS[:4], close=False)
    _as_schema_1_0(old)
    assert zarr.open_group(old, mode="r")["text"].dtype.kind in "OTU"
    assert_same_trace(open_trace(old).compute(), want)  # 1.0 reads as it always did
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, checkpoint=loaded.digest)
    with pytest.raises(TraceStoreError, match=r"schema 1\.0 store.*migrate_store"):
        TraceStore.open_for_append(old, t.attrs(), t.layout)
    assert migrate_store(old, vocab=t.vocab()) == "1.1" and migrate_store(old) == "1.1"  # the second: nothing to do
    g = zarr.open_group(old, mode="r")
    assert "text" not in g and "vocab_text" in g and g.attrs["schema_version"] == "1.1"
    assert_same_trace(open_trace(old).compute(), want)
    assert not open_trace(old).attrs["complete"]
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    store = TraceStore.open_for_append(old, t.attrs(), t.layout)  # a migrated store can be continued
    with t:
        for batch, n in run_windows(t, TEXTS[4:8], loaded.tokenizer, seq0=4):
            store.append(batch, windows=n)
    store.close()
    ds = open_trace(old)
    assert ds.attrs["complete"]
    np.testing.assert_array_equal(ds.token_id.values, in_memory(loaded, TEXTS[:8]).token_id.values)
    assert list(ds.text.values) == list(in_memory(loaded, TEXTS[:8]).text.values)


def test_migration_refuses_a_store_whose_texts_disagree_and_changes_nothing(tmp_path, loaded):
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS[:3])
    _as_schema_1_0(path)
    g = zarr.open_group(path, mode="r+")
    text = g["text"][:]
    text[-1] = "not what token " + str(g["token_id"][len(text) - 1]) + " says elsewhere"
    ids = g["token_id"][:]
    if (ids == ids[-1]).sum() < 2:  # make sure the id occurs twice
        ids[-1] = ids[0]
        g["token_id"][:] = ids
    g["text"][:] = text
    before = open_trace(path).compute()
    with pytest.raises(TraceStoreError, match=f"token id {ids[-1]} has two texts"):
        migrate_store(path)
    with pytest.raises(TraceStoreError, match=f"token id {ids[-1]} has two texts"):
        migrate_store(path, vocab=Trace(loaded.model, tokenizer=loaded.tokenizer).vocab())
    with pytest.raises(TraceStoreError, match="vocab has 3 entries"):
        migrate_store(path, vocab=["a", "b", "c"])
    assert zarr.open_group(path, mode="r").attrs["schema_version"] == "1.0"
    assert_same_trace(open_trace(path).compute(), before)


def test_newer_minor_versions_open_and_a_newer_major_is_refused_by_name(tmp_path, loaded):
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS[:3], sites=["expert_ids"])
    g = zarr.open_group(path, mode="r+")
    # a newer minor version adds a variable (kept) and this store lacks optional ones (absent, not an error)
    g.attrs["schema_version"] = "1.4"
    n = g["token_id"].shape[0]
    extra = g.create_array("router_entropy", shape=(n,), dtype="float32", dimension_names=["token"])
    extra[:] = np.arange(n, dtype=np.float32)
    ds = open_trace(path)
    np.testing.assert_array_equal(ds.router_entropy.values, np.arange(n))
    assert "router_scores" not in ds and "expert_weights" not in ds
    assert ds.text.values[0] == loaded.tokenizer.token_text(int(ds.token_id.values[0]))
    g.attrs["schema_version"] = "2.0"
    with pytest.raises(SchemaError, match=rf"{path}: trace schema 2\.0 cannot be read.*upgrade the workbench"):
        open_trace(path)
    t = Trace(loaded.model, ["expert_ids"], checkpoint=loaded.digest)
    with pytest.raises(SchemaError, match=r"schema 2\.0"):
        TraceStore.open_for_append(path, t.attrs(), t.layout)
    with pytest.raises(SchemaError, match=r"schema 2\.0"):
        migrate_store(path)
    g.attrs["schema_version"] = "one"
    with pytest.raises(SchemaError, match="'one' is not MAJOR.MINOR"):
        open_trace(path)


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
    shutil.rmtree(holed / "expert_ids")
    with pytest.raises(TraceStoreError, match=r"partial store: arrays \['expert_ids'\]"):
        open_trace(holed)
    with pytest.raises(TraceStoreError, match="already exists"):
        write_store(holed, loaded, TEXTS[:3])


def _edit_meta(meta: Path, change) -> None:
    data = json.loads(meta.read_text())
    change(data)
    meta.write_text(json.dumps(data))


def _claim_tokens(path: Path, n: int, last_chunk: bool = False) -> None:
    """Writer 0 claims n committed tokens and every token array n rows, without a chunk written (unless
    `last_chunk`: a copy of token_id's first chunk file where the n-th token's chunk would be)."""
    zarr.open_group(path, mode="r+")["progress"][0, 0] = n
    for meta in path.glob("*/zarr.json"):
        if (json.loads(meta.read_text()).get("dimension_names") or [""])[0] == "token":
            _edit_meta(meta, lambda d: d["shape"].__setitem__(0, n))
    if last_chunk:
        shutil.copy(path / "token_id" / "c" / "0", path / "token_id" / "c" / str((n - 1) // 32))


def _claim_layout(path: Path, **fields) -> None:
    def change(d: dict) -> None:
        d["attributes"]["layout"] = json.dumps({**json.loads(d["attributes"]["layout"]), **fields})
    _edit_meta(path / "zarr.json", change)


def _claim_writers(path: Path, n: int) -> None:
    _edit_meta(path / "zarr.json", lambda d: d["attributes"].__setitem__("writers", n))
    _edit_meta(path / "progress" / "zarr.json", lambda d: d["shape"].__setitem__(0, n))


def _set_chunk_rows(meta: Path, n: int) -> None:
    _edit_meta(meta, lambda d: d["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, n))


CLAIMS = {  # what an edited store claims -> the refusal; before the limits, 10^10 tokens took 15 s and 2.9 GB
    "1e10 tokens": (lambda p: _claim_tokens(p, 10**10), r"claims 10,000,000,000 committed tokens.* 1 are on disk"),
    "1e12 tokens": (lambda p: _claim_tokens(p, 10**12), r"committed tokens, 31,250,000,000 chunks of token_id"),
    "1e10 tokens, last chunk present": (lambda p: _claim_tokens(p, 10**10, last_chunk=True), r"but 2 are on disk"),
    "1e12 rows, 50 committed": (lambda p: _edit_meta(p / "expert_ids" / "zarr.json",
                                                     lambda d: d["shape"].__setitem__(0, 10**12)), None),
    "finer chunks than token_id": (lambda p: _set_chunk_rows(p / "expert_ids" / "zarr.json", 1),
                                   r"chunks of expert_ids, but 1 are on disk"),
    "1e12 layers": (lambda p: _claim_layout(p, n_layers=10**12),
                    r"layout n_layers claims 1,000,000,000,000, more than the 1,024"),
    "1e9 experts": (lambda p: _claim_layout(p, n_experts=10**9), r"layout n_experts claims"),
    "1e12 vocab": (lambda p: _edit_meta(p / "vocab_text" / "zarr.json", lambda d: d["shape"].__setitem__(0, 10**12)),
                   r"vocab_text claims 1,000,000,000,000, more than the 4,194,304"),
    "1e9 writers": (lambda p: _claim_writers(p, 10**9), r"attrs writers claims 1,000,000,000, more than the 65,536"),
    "progress rows for other writers": (lambda p: _edit_meta(p / "progress" / "zarr.json",
                                                             lambda d: d["shape"].__setitem__(0, 10**9)),
                                        r"progress has shape \(1000000000, 3\) for 1 writers"),
    "1e9-row chunks": (lambda p: _set_chunk_rows(p / "expert_ids" / "zarr.json", 10**9), r"one chunk of expert_ids"),
    "1e6 layers in expert_ids": (lambda p: _edit_meta(p / "expert_ids" / "zarr.json", lambda d: d["shape"].__setitem__(1, 10**6)),
                                 r"expert_ids has 1,000,000 along 'layer', the layout \d+"),
    "100k-deep array metadata": (lambda p: (p / "expert_ids" / "zarr.json").write_text("[" * 100_000 + "]" * 100_000),
                                 r"unreadable array metadata \(RecursionError"),
    "5 MB metadata": (lambda p: _edit_meta(p / "zarr.json", lambda d: d["attributes"].__setitem__("notes", "x" * 5_000_000)),
                      r"zarr.json is 5,00\d,\d\d\d bytes, more than the 4,194,304"),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_what_a_store_claims_is_checked_before_anything_of_that_size_is_built(tmp_path, loaded, claim):
    path = tmp_path / "t.zarr"
    write_store(path, loaded, TEXTS[:3], chunk_tokens=32)
    committed = open_trace(path).sizes["token"]
    edit, refusal = CLAIMS[claim]
    edit(path)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        if refusal is None:  # a claim the reader can simply ignore: only the committed rows are read
            assert open_trace(path).expert_ids.shape[0] == committed
        else:
            with pytest.raises(TraceStoreError, match=refusal):
                open_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 32 << 20, f"{peak / 1e6:.0f} MB"


def test_a_store_of_several_writers_opens_with_each_writers_committed_rows(tmp_path, loaded):
    path = tmp_path / "w.zarr"
    t = Trace(loaded.model, None, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    first = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=32, writers=2, region_tokens=64, vocab=t.vocab())
    for w, texts in enumerate((TEXTS[:2], TEXTS[2:4])):
        store = first if w == 0 else TraceStore.open_for_append(path, t.attrs(), t.layout, writer=w)
        with t:
            for batch, n in run_windows(t, texts, loaded.tokenizer, seq0=1000 * w):
                store.append(batch, windows=n)
        store.close()
    ds = open_trace(path)
    want = [in_memory(loaded, TEXTS[:2]), in_memory(loaded, TEXTS[2:4])]
    np.testing.assert_array_equal(ds.token_id.values, np.concatenate([w.token_id.values for w in want]))
    np.testing.assert_array_equal(ds.expert_ids.values, np.concatenate([w.expert_ids.values for w in want]))
    assert ds.attrs["committed_tokens"] == sum(w.sizes["token"] for w in want)
