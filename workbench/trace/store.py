"""TraceStore: a zarr v3 group that grows along `token` one committed flush at a time (readers: reader.py).

Design choices:
- Batches are buffered in memory and written in chunk-aligned flushes (default: once a chunk's worth of tokens is
  waiting), all arrays of a flush concurrently. The rows of a partly filled last chunk stay in memory too, so the
  next flush rewrites that chunk whole from memory instead of reading it back. zarr's per-call cost, not bytes,
  was what made one write per array per batch slow, so chunks are encoded here and written as files on a pool of
  threads the store keeps for its life (zarr_io.py).
- Commit protocol: a flush writes its arrays first, then replaces the writer's row of the `progress` array
  (tokens, windows, done), which is one chunk of its own. Every file is written to a temporary name and renamed,
  so a kill at any moment leaves either the old or the new file, never a torn one; bytes past a writer's committed
  count are ignored by `open_trace`. Hence a killed run opens with every committed flush, marked incomplete, and a
  resumed run rewrites whatever the killed flush left half-written. Commits fall on batch boundaries only, so a
  resumed run rebuilds exactly the batches an uninterrupted one would have run.
- Several writers: the token axis is cut into regions of `region_tokens` (a multiple of the chunk), one per
  writer, and `progress` has one row per writer in its own chunk, so writers never write the same file.
- One handle per region: a writer holds an exclusive OS lock on its region (`writer_lock.WriterLock`) from create/open to
  close, so a second writer of the same region is refused instead of interleaving commits (readers saw the
  committed count go backwards). The OS drops the lock when the process dies, so a killed writer never blocks
  --resume. Writers of different regions take different locks and run together.
- A single writer owns one region, created with room for INITIAL_CHUNKS chunks (metadata only) and grown
  GROWTH-fold when full; close trims it, after which plain `xarray.open_zarr` sees exactly the trace.
- Schema 1.1 keeps the token text once per vocabulary entry (`vocab_text`); readers derive the `text`
  coordinate from `token_id`. A V3.2 / V4 layout is written as 1.2 (its per-layer coords as small arrays too).
- Appending checks the model config, checkpoint digest, schema version and layout first and refuses a
  mismatch before writing a byte. Creating refuses a path that holds anything, and a failed create (a full disk)
  removes what it wrote, so the rerun that follows the fix creates the store as if nothing had happened.
Shape legend: N tokens, L MoE layers, k top-k, V vocabulary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous

from workbench.trace.schema import (
    BASE_VERSION,
    BY_NAME,
    COORDS,
    DERIVED,
    PROGRESS,
    PROGRESS_FIELDS,
    STORED_TEXT_VERSIONS,
    VOCAB,
    VOCAB_TEXT,
    WRITER,
    Layout,
    SchemaError,
)
from workbench.trace.storage import LocalStorage, Storage, new_run_id, storage_for
from workbench.trace.writer_lock import WriterLock, os_error_reason
from workbench.trace.zarr_io import TraceStoreError, array_of, chunk_blocks, open_store, run_async, zstd_codec

StoreLocation = str | Path | Storage  # a folder, a URL (s3://bucket/run.zarr) or a storage

DEFAULT_CHUNK_TOKENS = 4096
REMOTE_CHUNK_TOKENS = 65536  # on object storage: per-request cost dominates, so fewer, larger objects
INITIAL_CHUNKS = 64  # a new single-writer store's row capacity, in chunks: capacity is metadata only (unwritten
# chunks take no disk) and readers trim to the committed rows, while each resize rewrites every array's metadata
GROWTH = 8  # capacity multiplier when a single writer outgrows it
CHUNK_BYTES = 8 << 20  # per-layer arrays keep whole layers in one chunk up to this size (uncompressed)
_IDENTITY_ATTRS = ("model_config", "checkpoint", "layout")  # what must match for batches to share a store


class AlreadyFinishedError(TraceStoreError):
    """The writer's region is marked done: there is nothing left to append (a repeated task is a no-op)."""


class TraceStore:
    """One writer's handle on a trace store; see the module docstring. Use `create` or `open_for_append`.

    `tokens` / `seqs` count what is committed on disk; `pending_tokens` what is buffered for the next flush.
    """

    def __init__(self, storage: Storage, group: zarr.Group, layout: Layout, writer: int,
                 flush_tokens: int | None = None, lock: WriterLock | None = None) -> None:
        self.storage, self.group, self.layout, self.writer = storage, group, layout, writer
        self.path: Path | str = storage.path if isinstance(storage, LocalStorage) else storage.url  # for messages
        self.lock = lock  # held until close() or release()
        self.created = self._made_dir = False  # `create` made the store (and its folder): `discard` may remove them
        attrs: dict[str, Any] = dict(group.attrs)
        self.writers = int(attrs["writers"])
        self.region_tokens = int(attrs["region_tokens"])  # 0: one growing region
        self.chunk_tokens = int(attrs["chunk_tokens"])
        self.flush_tokens = max(1, flush_tokens if flush_tokens is not None else self.chunk_tokens)
        self.arrays = {n: array_of(group, n) for n in layout.stored_names()}
        self.progress = array_of(group, PROGRESS)
        self._row_key = f"{PROGRESS}/{self.progress.metadata.encode_chunk_key((writer, 0))}"
        self._row_version: str | None = None  # the ETag our next commit must replace (object storage)
        self._pending: list[dict[str, np.ndarray]] = []
        self.pending_tokens = self.pending_seqs = 0
        self._tail: dict[str, np.ndarray] = {}  # committed rows of the last, partly filled chunk
        self._capacity = min(a.shape[0] for a in self.arrays.values()) if self.arrays else 0
        self._sync_writes = False  # True: write array by array (the reference path for tests)
        self._pool: ThreadPoolExecutor | None = None  # chunk encoders/writers, kept for the store's life
        # the direct path's codec per array (None: written through zarr); fixed when the store was created
        self._codecs: dict[str, Any] = {n: zstd_codec(a) for n, a in (*self.arrays.items(), (PROGRESS, self.progress))}
        row = self._read_row()
        self.tokens, self.seqs, self.finished = int(row[0]), int(row[1]), bool(row[2])

    def _read_row(self) -> np.ndarray:
        """This writer's progress row; on object storage with its ETag, read in the same GET, so the first commit
        is fenced against any attempt that committed after this read."""
        codec = self._codecs[PROGRESS]
        if self.storage.local or codec is None:
            return np.asarray(self.progress[self.writer])
        payload, self._row_version = self.storage.get_versioned(self._row_key)
        if payload is None:
            return np.zeros(len(PROGRESS_FIELDS), dtype=np.int64)
        return np.frombuffer(codec.decode(payload), dtype="<i8")[: len(PROGRESS_FIELDS)].astype(np.int64)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: StoreLocation, attrs: dict[str, Any], layout: Layout, *,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, writers: int = 1, region_tokens: int = 0, writer: int = 0,
               vocab: Sequence[str] | np.ndarray | None = None, flush_tokens: int | None = None,
               storage_options: dict[str, Any] | None = None, run_id: str | None = None) -> TraceStore:
        """A new, empty store, holding writer `writer`'s lock; refuses a path that holds anything (so nothing is
        ever overwritten) or that another writer is creating.

        `vocab`: the text of every token id (index = id), stored once as `vocab_text`; without it `text` reads "".
        `flush_tokens`: buffer this many tokens before writing (default one chunk; 1 writes every batch at once).
        A create that fails part way (a full disk, an interrupt) removes what it wrote, the folder too when it made
        it, and raises TraceStoreError for an OSError: a rerun then starts from a clean path.
        On object storage (`path` an s3:// ... URL) the creator first claims the prefix with a conditional PUT
        (`run_id` names it in the loser's error), so of two creators exactly one wins.
        """
        storage = storage_for(path, storage_options)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if writers > 1 and (region_tokens < chunk_tokens or region_tokens % chunk_tokens):
            raise ValueError(f"with {writers} writers, region_tokens ({region_tokens}) must be a positive multiple "
                             f"of chunk_tokens ({chunk_tokens}) so no two writers share a chunk")
        storage.check_folder()
        made = not storage.exists()
        lock = storage.lock(writer)  # before looking inside: a writer creating this path right now refuses us
        try:
            storage.claim(run_id or new_run_id())
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if storage.holds_data():
            if lock is not None:
                lock.release()
            raise TraceStoreError(f"{storage.name} already exists; pass --resume to continue it or choose a new path")
        try:
            store = cls._build(storage, attrs, layout, chunk_tokens, writers, region_tokens, writer, vocab,
                               flush_tokens)
        except BaseException as e:
            storage.remove_created(made)
            if lock is not None:
                lock.release()
            if isinstance(e, OSError):
                raise TraceStoreError(f"creating {storage.name} failed ({os_error_reason(e)}); removed what was "
                                      "written, rerun once fixed") from e
            raise
        store.lock, store.created, store._made_dir = lock, True, made
        return store

    @classmethod
    def _build(cls, storage: Storage, attrs: dict[str, Any], layout: Layout, chunk_tokens: int,
               writers: int, region_tokens: int, writer: int, vocab: Sequence[str] | np.ndarray | None,
               flush_tokens: int | None
               ) -> TraceStore:
        """The arrays, `progress` and the group attrs (last: a store without them is recognisably partial)."""
        group = zarr.open_group(storage.zarr_store, mode="a", zarr_format=3)  # "a": the folder holds our lock; create checked it
        capacity = writers * region_tokens if writers > 1 else INITIAL_CHUNKS * chunk_tokens
        coord_names = " ".join(n for n in COORDS if n not in DERIVED)
        specs: list[tuple[str, dict[str, Any], Any]] = []  # (name, create_array kwargs, values or None)
        for name in layout.stored_names():
            var = BY_NAME[name]
            shape = layout.shape(name, capacity)
            specs.append((name, {"shape": shape, "chunks": _chunks(shape, chunk_tokens, np.dtype(var.dtype).itemsize),
                                 "dtype": var.dtype, "fill_value": var.fill, "dimension_names": list(var.dims),
                                 "attributes": {} if var.coord else {"coordinates": coord_names, "doc": var.doc}},
                          None))
        for axis, (dims, values) in layout.axis_coords().items():
            specs.append((axis, {"shape": values.shape, "dtype": str if values.dtype == object else values.dtype,
                                 "dimension_names": list(dims)}, values))
        if vocab is not None:
            specs.append((VOCAB_TEXT, {"shape": (len(vocab),), "dtype": str, "dimension_names": [VOCAB],
                                       "attributes": {"doc": "decoded text of each token id; "
                                                             "`text` = vocab_text[token_id]"}},
                          np.asarray(list(vocab), dtype=object)))
        run_async(_create_arrays(storage.zarr_store, specs))
        progress = group.create_array(PROGRESS, shape=(writers, len(PROGRESS_FIELDS)), chunks=(1, len(PROGRESS_FIELDS)),
                                      dtype="int64", fill_value=0, dimension_names=[WRITER, "progress_field"],
                                      attributes={"fields": list(PROGRESS_FIELDS)})
        progress[:] = 0
        # group attrs last, in one write of zarr.json (attrs.update would write it once per key, and a shard joining
        # between two of those writes would see "writers" without "region_tokens"): a store without them is partial
        group = group.update_attributes({**attrs, "schema_version": layout.schema_version(), "complete": False,
                                         "writers": writers, "region_tokens": region_tokens,
                                         "chunk_tokens": chunk_tokens})
        return cls(storage, group, layout, writer, flush_tokens)

    @classmethod
    def open_for_append(cls, path: StoreLocation, attrs: dict[str, Any], layout: Layout, *, writer: int = 0,
                        flush_tokens: int | None = None, storage_options: dict[str, Any] | None = None) -> TraceStore:
        """Reopen a store to continue it; refuses one written for another model, checkpoint, schema or layout."""
        storage = storage_for(path, storage_options)
        path = storage.name
        group, found = open_store(storage, mode="r+")
        version = str(found["schema_version"])
        if version in STORED_TEXT_VERSIONS:
            raise TraceStoreError(f"{path} is a schema {version} store (per-token text); run "
                                  f"`workbench.trace.migrate_store({str(path)!r})` once to make it {BASE_VERSION}, "
                                  "then resume")
        for key in _IDENTITY_ATTRS:
            if found.get(key) != attrs.get(key):
                raise TraceStoreError(f"{path} holds a trace of another {_what(key)}; "
                                      f"refusing to append (store: {_short(found.get(key))}, "
                                      f"this run: {_short(attrs.get(key))})")
        if not 0 <= writer < int(found["writers"]):
            raise TraceStoreError(f"{path} has {found['writers']} writer regions; writer {writer} does not exist")
        missing = [n for n in (*layout.stored_names(), PROGRESS) if n not in group]
        if missing:
            raise TraceStoreError(f"{path} is a partial store: arrays {missing} are missing")
        lock = storage.lock(writer)  # before reading progress or touching a file: the region is ours from here
        try:
            store = cls(storage, group, layout, writer, flush_tokens, lock)
            if store.finished:
                raise AlreadyFinishedError(f"{path}: writer {writer} already finished this store ({store.tokens} tokens)")
            storage.remove_partials(None if store.writers == 1 else store._owns_chunk)  # ours only: others may be
            # writing their regions right now
            store._load_tail()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    # ------------------------------------------------------------------ writing
    def append(self, batch: dict[str, np.ndarray], windows: int) -> None:
        """Queue one batch of N tokens (`windows` forward windows); flush once `flush_tokens` are waiting.

        A batch is committed by the flush that writes it; until then a crash loses it (and --resume redoes it).
        """
        n = len(batch["token_id"])
        missing = [k for k in self.arrays if k not in batch]
        if missing:
            raise SchemaError(f"batch lacks {missing}")
        for name, arr in self.arrays.items():
            data = batch[name]
            if data.shape[1:] != arr.shape[1:] or len(data) != n:
                raise SchemaError(f"batch {name} has shape {data.shape}, store expects [{n}, *{arr.shape[1:]}]")
        self._pending.append({name: batch[name] for name in self.arrays})
        self.pending_tokens += n
        self.pending_seqs += windows
        if self.pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        """Write every queued batch (chunk-aligned, all arrays at once), then commit them; all or nothing on disk."""
        if not self._pending:
            return
        n, tail = self.pending_tokens, len(next(iter(self._tail.values()))) if self._tail else 0
        base = self.writer * self.region_tokens
        start = base + self.tokens - tail  # a chunk boundary: the tail's rows are rewritten from memory
        end = base + self.tokens + n
        data = {name: np.concatenate([*([self._tail[name]] if tail else []), *(b[name] for b in self._pending)])
                for name in self.arrays}
        try:
            self._ensure_capacity(end - base)
            self._write_all(start, end, data)
            self._commit(self.tokens + n, self.seqs + self.pending_seqs, done=False)
        except OSError as e:
            raise OSError(e.errno, f"writing tokens {self.tokens}..{self.tokens + n} of {self.path} failed "
                                   f"({os_error_reason(e)}); the store keeps its {self.tokens} committed tokens, rerun with "
                                   "--resume once fixed") from e
        self.tokens += n
        self.seqs += self.pending_seqs
        self._pending, self.pending_tokens, self.pending_seqs = [], 0, 0
        keep = (end - base) % self.chunk_tokens  # rows in the last, partly filled chunk
        self._tail = {name: a[len(a) - keep:].copy() for name, a in data.items()} if keep else {}

    def _write_all(self, start: int, end: int, data: dict[str, np.ndarray]) -> None:
        """Rows start:end of every array, `start` on a chunk boundary. Arrays with this module's own codecs (bytes
        + zstd) take the direct path: whole chunks encoded here and written as files on a few threads, because
        zarr's per-call overhead, not the bytes, dominated. Anything else goes through zarr's async API. The tests
        hold the direct path to the plain one (`_sync_writes`: zarr's setitem, array by array), read back by zarr."""
        if self._sync_writes:
            for name, a in data.items():
                self._write(name, start, end, a)
            return
        direct = {n: a for n, a in data.items() if self._codecs[n] is not None}
        blocks = [b for n, a in direct.items() for b in chunk_blocks(self.arrays[n], n, self._codecs[n], start, a)]
        if self._pool is None:  # zstd releases the GIL: chunks compress in parallel too
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="trace-store")
        futures = [self._pool.submit(self._encode_and_put, key, codec, block) for key, codec, block in blocks]
        wait(futures)
        for f in futures:
            f.result()  # the first failure, after every write has stopped
        rest = {n: a for n, a in data.items() if n not in direct}
        if rest:
            async def write_rest() -> None:
                results = await asyncio.gather(*(self._write_async(n, start, end, a) for n, a in rest.items()),
                                               return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r

            with zarr.config.set({"array.write_empty_chunks": True}):  # skips a per-chunk compare with the fill
                run_async(write_rest())

    def _encode_and_put(self, key: str, codec: Any, block: np.ndarray) -> None:
        self._put(key, codec.encode(block))

    def _put(self, key: str, payload: bytes) -> None:
        """One whole chunk: a renamed temporary file on disk, one PUT on object storage; never torn."""
        self.storage.put(key, payload)

    async def _write_async(self, name: str, start: int, end: int, data: np.ndarray) -> None:
        await self.arrays[name].async_array.setitem(slice(start, end), data)

    def _write(self, name: str, start: int, end: int, data: np.ndarray) -> None:
        """One array's rows start:end through zarr's synchronous API: the plain path."""
        self.arrays[name][start:end] = data

    def _commit(self, tokens: int, seqs: int, done: bool) -> None:
        """This writer's progress row, which is one whole chunk of `progress`: written directly (one small file,
        atomically renamed; on object storage one PUT if the row is still the one this handle last read or
        wrote, else `SupersededError`) when the store has the default codecs, else through zarr."""
        row = np.array([[tokens, seqs, int(done)]], dtype=np.int64)
        codec = self._codecs[PROGRESS]
        if self._sync_writes or codec is None:
            self.progress[self.writer] = row[0]
            return
        [(key, _, block)] = chunk_blocks(self.progress, PROGRESS, codec, self.writer, row)
        if self.storage.local:
            self._put(key, codec.encode(block))
        else:
            self._row_version = self.storage.put_versioned(key, codec.encode(block), self._row_version)

    def _ensure_capacity(self, end: int) -> None:
        """Room for `end` rows of this writer's region."""
        if self.writers > 1:
            if end > self.region_tokens:
                raise TraceStoreError(f"writer {self.writer}'s region of {self.region_tokens} tokens is full")
            return
        if end <= self._capacity:
            return
        new = max(end, GROWTH * self._capacity)  # few resizes: each rewrites every array's metadata
        new = -(-new // self.chunk_tokens) * self.chunk_tokens
        self._resize_all(new)

    def _resize_all(self, rows: int) -> None:
        """Every token array to `rows` rows. Shrinking drops the chunks past the end: for arrays with the default
        chunk keys by removing whole `name/c/<i>` folders (zarr's own resize asks the store about every chunk
        index of the old shape, ~0.1 s for a 64-chunk capacity), else through zarr."""
        direct = {n for n in self.arrays if self._codecs[n] is not None}

        async def resize_all() -> None:
            await asyncio.gather(*(a.async_array.resize((rows, *a.shape[1:]), delete_outside_chunks=n not in direct)
                                   for n, a in self.arrays.items() if a.shape[0] != rows))

        shrinking = {n for n in direct if self.arrays[n].shape[0] > rows}
        run_async(resize_all())
        for name in shrinking:
            self.storage.drop_token_chunks(name, -(-rows // self.arrays[name].chunks[0]))  # 0..keep-1 stay
        if any(a.shape[0] != rows for a in self.arrays.values()):  # zarr 3.1.6 resizes the handles in place; else reopen
            self.arrays = {n: array_of(self.group, n) for n in self.arrays}
        self._capacity = rows

    def _owns_chunk(self, name: str, index: int) -> bool:
        """Whether chunk `index` (along the first axis) of array `name` lies in this writer's region."""
        if name == PROGRESS:
            return index == self.writer
        chunks = self.region_tokens // self.chunk_tokens
        return name in self.arrays and self.writer * chunks <= index < (self.writer + 1) * chunks

    def _load_tail(self) -> None:
        """After reopening: the committed rows of the partly filled last chunk, so flushes stay chunk-aligned."""
        keep = self.tokens % self.chunk_tokens
        if keep:
            base = self.writer * self.region_tokens
            self._tail = {name: np.asarray(a[base + self.tokens - keep: base + self.tokens])
                          for name, a in self.arrays.items()}

    def close(self, complete: bool = True, finalize: bool = True) -> None:
        """Flush, then mark this writer done; a single writer also trims the arrays so plain readers see exactly
        the trace. `complete=False` only flushes (the run stopped early and may be resumed). `finalize=False`
        leaves the root metadata (attrs["complete"]) to the driver of a cluster run. Either way the writer lock is
        released last, also when closing fails."""
        try:
            try:
                self.flush()
            finally:
                self._stop_pool()
            if not complete:
                return
            if self.writers == 1:
                self._resize_all(self.tokens)
            self._commit(self.tokens, self.seqs, done=True)
            self.finished = True
            if finalize and np.asarray(self.progress[:])[:, 2].all():
                self.group.attrs["complete"] = True
        finally:
            self.release()

    def release(self) -> None:
        """Give up this handle without committing what is buffered: stop the writer threads and drop the lock, so
        another handle (a --resume) may take the region. For a writer that stopped on an error."""
        self._stop_pool()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> bool:
        """Remove a store this handle created that has no committed tokens (a run that failed before its first
        commit), so a plain rerun can create it again; anything else is kept. Releases the handle; returns
        whether the store was removed."""
        empty = self.created and self.writers == 1 and self.tokens == 0
        self._stop_pool()
        if empty:
            self.storage.remove_created(self._made_dir)
        self.release()
        return empty

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def last_window(self) -> np.ndarray:
        """Token ids of the last committed window (resume checks the input still starts the same way)."""
        if self.tokens == 0:
            return np.empty(0, dtype=np.int32)
        base = self.writer * self.region_tokens
        lo = max(base, base + self.tokens - 65536)
        seq = np.asarray(self.arrays["seq"][lo:base + self.tokens])
        ids = np.asarray(self.arrays["token_id"][lo:base + self.tokens])
        return ids[seq == seq[-1]]


async def _create_arrays(store: Any, specs: list[tuple[str, dict[str, Any], Any]]) -> None:
    group = await zarr.api.asynchronous.open_group(store=store, mode="r+", zarr_format=3)

    async def one(name: str, kwargs: dict[str, Any], values: Any) -> None:
        arr = await group.create_array(name, **kwargs)
        if values is not None:
            await arr.setitem(slice(None), values)

    # every write finishes before the first failure is raised: `create` removes what was written, and a write
    # still in flight would put files back into the folder it removes
    results = await asyncio.gather(*(one(*spec) for spec in specs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _chunks(shape: tuple[int, ...], chunk_tokens: int, itemsize: int) -> tuple[int, ...]:
    """chunk_tokens along token; whole layers per chunk while a chunk stays under CHUNK_BYTES (fewer files to
    write), else one layer per chunk (so reading one layer of a wide variable reads only that layer)."""
    if len(shape) < 3:
        return (chunk_tokens, *shape[1:])
    row = itemsize * int(np.prod(shape[2:]))
    layers = max(1, min(shape[1], CHUNK_BYTES // max(1, chunk_tokens * row)))
    return (chunk_tokens, layers, *shape[2:])


def _what(key: str) -> str:
    return {"model_config": "model (config differs)", "checkpoint": "checkpoint (digest differs)",
            "layout": "selection of sites (variables or axes differ)"}.get(key, key)


def _short(value: Any, n: int = 80) -> str:
    s = str(value)
    return s if len(s) <= n else s[: n - 3] + "..."
