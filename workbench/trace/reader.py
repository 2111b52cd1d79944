"""Reading trace stores: `open_trace` (a lazy, dask-backed Dataset of every committed token, any writer, any
schema 1.x, V3.2 / V4 stores of 1.2 included) and `migrate_store` (schema 1.0 -> 1.1 in place).

`open_trace` builds the Dataset from dask arrays over each writer's committed rows rather than through
`xarray.open_zarr`, because after a crash the arrays may have different capacities.

Nothing a store claims sizes what opening it reads or builds until the claim is checked: every zarr.json is
bounded in bytes, axis sizes and chunk shapes against sane limits (MAX_*), the axes against the layout, and the
committed token count (the `progress` rows) against the chunk files actually on disk. The dask arrays cover the
committed rows only, whatever length an array's metadata claims. So a hand-edited or corrupt store is refused in
milliseconds instead of costing minutes and gigabytes (a claim of 10^10 tokens used to take 15 s and 2.9 GB).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from workbench.trace.schema import (
    BASE_VERSION,
    LAYER,
    LAYER_ALL,
    PROGRESS,
    PROGRESS_FIELDS,
    SITE,
    STORED_TEXT_VERSIONS,
    TOKEN,
    VOCAB,
    VOCAB_TEXT,
    Layout,
    build_dataset,
)
from workbench.trace.storage import Storage, storage_for
from workbench.trace.zarr_io import TraceStoreError, array_of, open_store

_AXES = (LAYER, LAYER_ALL, SITE)
_TOKEN_ID = "token_id"  # the coordinate every committed token writes (ids are never the fill value), so its
# chunk files on disk vouch for the committed count

# What a store may claim (a real V3 store: 61 layers, 256 experts, 129k vocabulary, 1 writer per process)
MAX_METADATA_BYTES = 4 << 20  # each zarr.json, the group's and every array's
MAX_STORE_ENTRIES = 1024  # files and folders directly in a store folder (a store has about 15 arrays)
MAX_WRITERS = 1 << 16  # regions: a writer each (--shard), or a task each (a cluster run: 10^10 tokens at 2^20 a task)
MAX_LAYERS = 1024  # transformer layers, hence MoE layers too
MAX_EXPERTS = 1 << 16  # routed experts; top-k and router scores follow it
MAX_LATENT = 1 << 16
MAX_SITES = 1024  # simulated FP8 sites
MAX_STREAMS = 64  # mHC residual streams (V4 has 4)
MAX_VOCAB = 1 << 22  # `vocab_text` is read whole on opening
MAX_CHUNK_BYTES = 1 << 28  # one decoded chunk: zarr allocates a whole chunk to read any row of it
MAX_ROW_CHUNKS = 4096  # chunks across the non-token axes of one array
AUTO_CHUNK_BYTES = 128 << 20  # chunks="auto": dask chunks of about this many bytes (dask's advice: >= 100 MB)


def open_trace(path: str | Path | Storage, storage_options: dict[str, Any] | None = None,
               chunks: Literal["auto"] | int | None = None) -> xr.Dataset:
    """A lazy (dask-backed) Dataset of every committed token of a trace store, any writer, any schema 1.x.

    `path`: a folder, or a URL on object storage (s3://bucket/run.zarr, gs://...; credentials and endpoint from
    the environment and `storage_options`). `chunks`: None reads as stored (one dask chunk per zarr chunk);
    "auto" merges whole zarr chunks along `token` into dask chunks of about AUTO_CHUNK_BYTES, which keeps a
    10^9-token graph at thousands of tasks, not hundreds of thousands; an int gives that many tokens per chunk
    (rounded up to whole zarr chunks). attrs["complete"] says whether every writer finished; an interrupted or
    running trace opens with what it committed. Variables of a newer minor version are kept as they are;
    optional ones a store lacks are simply absent.
    """
    storage = storage_for(path, storage_options)
    path = storage.name
    group, attrs, progress = _open_progress(storage)  # [writers, fields]
    writers, region = progress.shape[0], int(attrs["region_tokens"])
    try:
        layout = Layout.from_json(json.loads(attrs["layout"]))
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise TraceStoreError(f"{path} is a corrupt trace store ({type(e).__name__}: {e})"[:500]) from None
    _check_layout(path, layout)
    members = _members(path, group)
    missing = [n for n in layout.stored_names() if n not in members]
    if missing:
        raise TraceStoreError(f"{path} is a partial store: arrays {missing} are missing")
    token_arrays = _token_arrays(path, members, layout, progress, region)
    _check_committed_on_disk(storage, token_arrays, progress, region)
    arrays: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name, arr in token_arrays.items():
        rows = _dask_rows(arr, chunks)
        parts = [_committed_rows(arr, w * region, int(progress[w, 0]), rows) for w in range(writers)
                 if writers == 1 or progress[w, 0] > 0] or [_committed_rows(arr, 0, 0, rows)]
        arrays[name] = (_dims(arr), parts[0] if len(parts) == 1 else da.concatenate(parts))
    if "text" not in arrays:  # schema >= 1.1: text = vocab_text[token_id]
        arrays["text"] = ((TOKEN,), _derived_text(path, group, arrays[_TOKEN_ID][1]))
    attrs["complete"] = bool(progress[:, 2].all())
    attrs["committed_tokens"] = int(progress[:, 0].sum())
    return build_dataset(arrays, layout, attrs)


def read_progress(path: str | Path | Storage, storage_options: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], np.ndarray, Callable[[int], str]]:
    """A store's attrs, its [regions, (tokens, seqs, done)] progress table, read under the same bounds as
    `open_trace` (metadata sizes, region count, row values), and the storage key of a region's row (its one
    chunk, as the progress array's metadata names it): for the status command and a resuming driver."""
    group, attrs, progress = _open_progress(storage_for(path, storage_options))
    encode = array_of(group, PROGRESS).metadata.encode_chunk_key
    return attrs, progress, lambda region: f"{PROGRESS}/{encode((region, 0))}"


def _open_progress(storage: Storage) -> tuple[zarr.Group, dict[str, Any], np.ndarray]:
    """The group, its attrs and its bounded progress table [writers, fields] (the checks every reader runs first)."""
    _check_metadata_files(storage)
    group, attrs = open_store(storage, mode="r")
    try:
        writers, region = int(attrs["writers"]), int(attrs["region_tokens"])
    except (KeyError, ValueError, TypeError) as e:
        raise TraceStoreError(f"{storage.name} is a corrupt trace store ({type(e).__name__}: {e})"[:500]) from None
    return group, attrs, _read_progress(storage.name, group, writers, region)


def _refuse_claim(path: object, what: str, claimed: int, limit: int) -> TraceStoreError:
    return TraceStoreError(f"{path}: {what} claims {claimed:,}, more than the {limit:,} a trace store may have; "
                           "the store is corrupt or was edited")


def _check_metadata_files(storage: Storage) -> None:
    """Each zarr.json zarr will parse is at most MAX_METADATA_BYTES (a regular file, on disk), and the store has
    at most MAX_STORE_ENTRIES members, before zarr reads any of them (it reads every member's metadata)."""
    if storage.local and not storage.exists():
        return  # open_store's to report
    try:
        for key, size in storage.metadata_sizes(MAX_STORE_ENTRIES):
            if size is not None and size > MAX_METADATA_BYTES:
                raise TraceStoreError(f"{storage.name}/{key} is {size:,} bytes, more than the {MAX_METADATA_BYTES:,} "
                                      "read of a zarr.json; the store is corrupt or was edited")
    except OverflowError as e:
        raise _refuse_claim(storage.name, "the store folder", int(e.args[0]), MAX_STORE_ENTRIES) from None
    except NotADirectoryError:
        return  # a file: open_store's to report


def _check_layout(path: str, layout: Layout) -> None:
    """Every axis the layout sizes is within the limits (coords such as `layer_all` are built from them)."""
    limits = [("layout n_layers", layout.n_layers, MAX_LAYERS), ("layout layers", len(layout.layers), MAX_LAYERS),
              ("layout n_experts", layout.n_experts, MAX_EXPERTS), ("layout top_k", layout.top_k, MAX_EXPERTS),
              ("layout latent", layout.latent, MAX_LATENT), ("layout fp8_sites", len(layout.fp8_sites), MAX_SITES),
              ("layout index_topk", layout.index_topk, MAX_LATENT), ("layout n_heads", layout.n_heads, MAX_EXPERTS),
              ("layout hc_mult", layout.hc_mult, MAX_STREAMS)]
    for what, claimed, limit in limits:
        if claimed > limit:
            raise _refuse_claim(path, what, claimed, limit)
        if claimed < 0:
            raise TraceStoreError(f"{path}: {what} is {claimed}; the store is corrupt")


def _read_progress(path: str, group: zarr.Group, writers: int, region: int) -> np.ndarray:
    """The [writers, fields] progress table, once its shape, chunks and values are those of `writers` writers."""
    if writers > MAX_WRITERS:
        raise _refuse_claim(path, "attrs writers", writers, MAX_WRITERS)
    if writers < 1 or region < 0:
        raise TraceStoreError(f"{path}: attrs say {writers} writers with regions of {region} tokens; the store is corrupt")
    try:
        arr = array_of(group, PROGRESS)
    except (KeyError, FileNotFoundError) as e:
        raise TraceStoreError(f"{path} is a corrupt trace store ({e!r})") from None
    if tuple(arr.shape) != (writers, len(PROGRESS_FIELDS)):
        raise TraceStoreError(f"{path}: progress has shape {tuple(arr.shape)} for {writers} writers")
    _check_chunk(path, PROGRESS, arr)
    progress = np.asarray(arr[:])
    tokens = progress[:, 0]
    if (tokens < 0).any() or (writers > 1 and (tokens > region).any()):
        raise TraceStoreError(f"{path}: progress claims {tokens.tolist()[:8]} committed tokens per writer, outside "
                              f"0..{region if writers > 1 else 'capacity'}; the store is corrupt")
    return progress


def _dims(arr: zarr.Array) -> tuple[str, ...]:
    return tuple(str(n) for n in getattr(arr.metadata, "dimension_names", None) or ())


def _members(path: str, group: zarr.Group) -> dict[str, Any]:
    """The group's arrays and groups by name; metadata zarr cannot parse makes the store corrupt, not a crash."""
    try:
        return dict(group.members())
    except Exception as e:  # zarr raises a zoo of types (and RecursionError) for garbled array metadata
        raise TraceStoreError(f"{path} has unreadable array metadata ({type(e).__name__}: {e})"[:500]) from None


def _token_arrays(path: str, members: dict[str, Any], layout: Layout, progress: np.ndarray, region: int
                  ) -> dict[str, zarr.Array]:
    """Every array along `token` (axes and progress aside), each checked: axes the layout sizes have its sizes,
    chunks are within the limits, and each writer's committed rows fit the array."""
    sizes = layout.sizes()
    out: dict[str, zarr.Array] = {}
    for name, arr in members.items():
        if not isinstance(arr, zarr.Array):
            continue
        dims = _dims(arr)
        if name in (*_AXES, PROGRESS) or not dims or dims[0] != TOKEN:
            continue
        for dim, n in zip(dims[1:], arr.shape[1:], strict=True):
            if dim in sizes and n != sizes[dim]:
                raise TraceStoreError(f"{path}: array {name} has {n:,} along {dim!r}, the layout {sizes[dim]}; "
                                      "the store is corrupt")
        _check_chunk(path, name, arr)
        for w, n in enumerate(progress[:, 0]):
            if w * region + int(n) > arr.shape[0]:
                raise TraceStoreError(f"{path}: array {name} holds {arr.shape[0]} rows, writer {w} committed "
                                      f"{w * region + int(n)}; the store is corrupt")
        out[name] = arr
    return out


def _chunk_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of what is stored per chunk file (the outer grid: a shard when sharded)."""
    return tuple(getattr(arr.metadata.chunk_grid, "chunk_shape", arr.chunks))


def _check_chunk(path: str, name: str, arr: zarr.Array) -> None:
    """One chunk decodes to at most MAX_CHUNK_BYTES, and the non-token axes are cut into at most MAX_ROW_CHUNKS."""
    chunks = _chunk_shape(arr)
    try:
        itemsize = max(np.dtype(arr.dtype).itemsize, 1)
    except TypeError:
        itemsize = 16
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise _refuse_claim(path, f"one chunk of {name} ({list(chunks)}, bytes)", chunk_bytes, MAX_CHUNK_BYTES)
    row_chunks = math.prod(-(-n // max(c, 1)) for n, c in zip(arr.shape[1:], chunks[1:], strict=True))
    if row_chunks > MAX_ROW_CHUNKS:
        raise _refuse_claim(path, f"the non-token axes of {name} (chunks)", row_chunks, MAX_ROW_CHUNKS)


def _committed_chunks(arr: zarr.Array, progress: np.ndarray, region: int) -> int:
    """How many distinct token chunks of `arr` hold committed rows (writers' regions may share none or some)."""
    rows = max(_chunk_shape(arr)[0], 1)
    spans = sorted((w * region // rows, (w * region + int(n) - 1) // rows) for w, n in enumerate(progress[:, 0]) if n > 0)
    count, reach = 0, -1
    for first, last in spans:
        first = max(first, reach + 1)
        if last >= first:
            count, reach = count + last - first + 1, last
    return count


def _chunk_files(storage: Storage, name: str, arr: zarr.Array, enough: int) -> int:
    """Token chunks of `arr` present in storage under its name, counted up to `enough` (the scan stops there)."""
    first = arr.metadata.encode_chunk_key((0,) * arr.ndim)
    second = arr.metadata.encode_chunk_key((1,) + (0,) * (arr.ndim - 1))
    same = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), len(first))
    prefix = first[:same]  # "c/" for the default keys, "c." for dotted ones
    sub, _, stem = prefix.rpartition("/")
    return storage.count_entries(f"{name}/{sub}" if sub else name, stem, enough)


def _check_committed_on_disk(storage: Storage, arrays: dict[str, zarr.Array],
                             progress: np.ndarray, region: int) -> None:
    """The committed token count is backed by `token_id` chunk files on disk, and so is any array cut into more
    token chunks than `token_id` (the writer never makes one): a Dataset is then built from at most as many
    chunks as there are files, whatever the progress table claims."""
    need = _committed_chunks(arrays[_TOKEN_ID], progress, region)
    for name, arr in arrays.items():
        chunks = _committed_chunks(arr, progress, region)
        if name != _TOKEN_ID and chunks <= need:
            continue
        found = _chunk_files(storage, name, arr, chunks)
        if found < chunks:
            raise TraceStoreError(f"{storage.name}: progress claims {int(progress[:, 0].sum()):,} committed tokens, "
                                  f"{chunks:,} chunks of {name}, but {found:,} are on disk; the store is corrupt")


class _Rows:
    """Rows [start, start + n) of a zarr array as an array-like for dask, so a Dataset over the committed rows
    is built from those rows alone, however many the array's metadata claims (dask sizes its graph by shape)."""

    def __init__(self, arr: zarr.Array, start: int, n: int) -> None:
        self.arr, self.start = arr, start
        self.shape = (n, *arr.shape[1:])
        self.dtype = arr.dtype
        self.ndim = arr.ndim

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        """One dask chunk: `key` holds a slice per axis (the graph asks for nothing else, see `_committed_rows`)."""
        rows, *rest = key
        first, stop, step = rows.indices(self.shape[0])
        return np.asarray(self.arr[(slice(self.start + first, self.start + stop, step), *rest)])


def _read_rows(rows: _Rows, key: tuple[slice, ...]) -> np.ndarray:
    return rows.read(key)


def _dask_rows(arr: zarr.Array, chunks: Literal["auto"] | int | None) -> int:
    """Tokens per dask chunk: whole zarr chunks, as stored (None), about AUTO_CHUNK_BYTES ("auto") or at least
    `chunks` tokens."""
    stored = _chunk_shape(arr)
    if chunks is None:
        return stored[0]
    if chunks == "auto":
        row_bytes = max(1, math.prod(arr.shape[1:]) * max(np.dtype(arr.dtype).itemsize if arr.dtype != object else 16, 1))
        want = max(1, AUTO_CHUNK_BYTES // row_bytes)
    elif isinstance(chunks, int) and chunks >= 1:
        want = chunks
    else:
        raise ValueError(f"chunks must be None, 'auto' or a positive int, got {chunks!r}")
    return max(1, -(-want // stored[0])) * stored[0]


def _committed_rows(arr: zarr.Array, start: int, n: int, rows_per_chunk: int) -> da.Array:
    """A dask array over rows [start, start + n) of `arr`, `rows_per_chunk` tokens per dask chunk (a multiple of
    the stored chunk) and the stored chunks across the other axes. Its getter is our own, so dask never fuses a
    later index (an int, a list) into the read: every read is a chunk's slices."""
    rows = _Rows(arr, start, n)
    meta = np.empty((0,) * arr.ndim, dtype=arr.dtype)
    return da.from_array(rows, chunks=(rows_per_chunk, *_chunk_shape(arr)[1:]), name=False, meta=meta,
                         getitem=_read_rows)


def _derived_text(path: str, group: zarr.Group, token_id: da.Array) -> da.Array:
    """The `text` coordinate of a 1.1 store, lazily: vocab_text[token_id] ("" for ids outside it or no table).
    The table is read whole, so its claimed size is checked first."""
    vocab = np.empty(0, object)
    if VOCAB_TEXT in group:
        stored = array_of(group, VOCAB_TEXT)
        if stored.shape[0] > MAX_VOCAB:
            raise _refuse_claim(path, VOCAB_TEXT, stored.shape[0], MAX_VOCAB)
        _check_chunk(path, VOCAB_TEXT, stored)
        vocab = np.asarray(stored[:], dtype=object)
    table = np.append(vocab, "")  # index -1 and out-of-range ids read ""

    def lookup(ids: np.ndarray) -> np.ndarray:
        return table[np.where((ids >= 0) & (ids < len(vocab)), ids, -1)]

    return da.map_blocks(lookup, token_id, dtype=object)


def migrate_store(path: str | Path, vocab: Sequence[str] | None = None) -> str:
    """Rewrite a schema 1.0 store as 1.1 in place (per-token `text` -> one `vocab_text` table); returns the
    version it now has. `vocab` (e.g. `Trace.vocab()`) gives the text of ids the store never saw, which tokens
    appended later need; without it they read "". Safe to interrupt: the table is written first, the version
    bumped next, the per-token array removed last, and a 1.1 store that still holds `text` reads the same."""
    storage = storage_for(path)
    group, attrs = open_store(storage, mode="r+")
    version = str(attrs["schema_version"])
    if version not in STORED_TEXT_VERSIONS:
        return version
    ds = open_trace(path)
    ids, text = np.asarray(ds.token_id.values), np.asarray(ds.text.values, dtype=object)
    vocab_size = int(json.loads(attrs["model_config"]).get("vocab_size", int(ids.max(initial=-1)) + 1))
    table = np.full(vocab_size, "", dtype=object)
    if vocab is not None:
        if len(vocab) != vocab_size:
            raise TraceStoreError(f"{path}: vocab has {len(vocab)} entries, the store's model {vocab_size}")
        table[:] = list(vocab)
    valid = (ids >= 0) & (ids < vocab_size)
    if vocab is None:
        table[ids[valid]] = text[valid]
    clash = np.nonzero(table[ids[valid]] != text[valid])[0]
    if len(clash):
        i = int(np.nonzero(valid)[0][clash[0]])
        raise TraceStoreError(f"{path}: token id {int(ids[i])} has two texts ({table[ids[i]]!r} and {text[i]!r}); "
                              "cannot store one text per id, the store is left as it was")
    if VOCAB_TEXT in group:
        del group[VOCAB_TEXT]
    arr = group.create_array(VOCAB_TEXT, shape=(vocab_size,), dtype=str, dimension_names=[VOCAB],
                             attributes={"doc": "decoded text of each token id; `text` = vocab_text[token_id]"})
    arr[:] = table
    group.attrs["schema_version"] = BASE_VERSION
    del group["text"]
    return BASE_VERSION
