"""TraceStore: a zarr v3 group that grows along `token` one committed batch at a time; `open_trace` reads it.

Design choices:
- Commit protocol: a batch's arrays are written first, then the writer's row of the `progress` array
  (tokens, windows, done) is replaced. zarr's LocalStore writes every file to a temporary name and renames it,
  so a kill at any moment leaves either the old or the new file, never a torn one; bytes past a writer's
  committed count are ignored by `open_trace`. Hence a killed run opens with every committed batch, marked
  incomplete, and a resumed run overwrites whatever the killed batch left half-written.
- Several writers: the token axis is cut into regions of `region_tokens` (a multiple of the chunk), one per
  writer, and `progress` has one row per writer in its own chunk, so writers never write the same file and
  need no lock. A single writer owns one region that grows (capacity doubles) and is trimmed on close, after
  which plain `xarray.open_zarr` sees exactly the trace.
- `open_trace` builds the Dataset from `dask.array.from_zarr` slices of each writer's committed rows rather than
  through `xarray.open_zarr`, because after a crash the arrays may have different capacities.
- Appending checks the model config, checkpoint digest, schema major version and layout first and refuses a
  mismatch before writing a byte.
Shape legend: N tokens, L MoE layers, k top-k.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from workbench.trace.schema import (
    BY_NAME,
    COORDS,
    LAYER,
    LAYER_ALL,
    PROGRESS,
    PROGRESS_FIELDS,
    SCHEMA_VERSION,
    SITE,
    TOKEN,
    WRITER,
    Layout,
    SchemaError,
    build_dataset,
    check_version,
)

DEFAULT_CHUNK_TOKENS = 4096
_IDENTITY_ATTRS = ("model_config", "checkpoint", "layout")  # what must match for batches to share a store
_AXES = (LAYER, LAYER_ALL, SITE)


class TraceStoreError(SchemaError):
    """A store that is missing, corrupt, or belongs to another model or schema; nothing was written."""


class TraceStore:
    """One writer's handle on a trace store; see the module docstring. Use `create` or `open_for_append`."""

    def __init__(self, path: Path, group: zarr.Group, layout: Layout, writer: int) -> None:
        self.path, self.group, self.layout, self.writer = path, group, layout, writer
        attrs: dict[str, Any] = dict(group.attrs)
        self.writers = int(attrs["writers"])
        self.region_tokens = int(attrs["region_tokens"])  # 0: one growing region
        self.chunk_tokens = int(attrs["chunk_tokens"])
        self.arrays = {n: _array(group, n) for n in layout.names()}
        self.progress = _array(group, PROGRESS)
        row = np.asarray(self.progress[writer])
        self.tokens, self.seqs = int(row[0]), int(row[1])

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, attrs: dict[str, Any], layout: Layout, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               writers: int = 1, region_tokens: int = 0, writer: int = 0) -> TraceStore:
        """A new, empty store; refuses an existing non-empty path so nothing is ever overwritten."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise TraceStoreError(f"{path} already exists; pass --resume to continue it or choose a new path")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if writers > 1 and (region_tokens < chunk_tokens or region_tokens % chunk_tokens):
            raise ValueError(f"with {writers} writers, region_tokens ({region_tokens}) must be a positive multiple "
                             f"of chunk_tokens ({chunk_tokens}) so no two writers share a chunk")
        group = zarr.open_group(path, mode="w-", zarr_format=3)
        capacity = writers * region_tokens if writers > 1 else chunk_tokens
        coord_names = " ".join(COORDS)
        for name in layout.names():
            var = BY_NAME[name]
            shape = layout.shape(name, capacity)
            chunks = (chunk_tokens, *(1 if d in (LAYER, LAYER_ALL) and len(shape) == 3 else n
                                      for d, n in zip(var.dims[1:], shape[1:], strict=True)))
            group.create_array(name, shape=shape, chunks=chunks, dtype=str if var.dtype == "str" else var.dtype,
                               fill_value=var.fill, dimension_names=list(var.dims),
                               attributes={} if var.coord else {"coordinates": coord_names, "doc": var.doc})
        for axis, (dims, values) in layout.axis_coords().items():
            arr = group.create_array(axis, shape=values.shape, dtype=str if values.dtype == object else values.dtype,
                                     dimension_names=list(dims))
            arr[:] = values
        progress = group.create_array(PROGRESS, shape=(writers, len(PROGRESS_FIELDS)), chunks=(1, len(PROGRESS_FIELDS)),
                                      dtype="int64", fill_value=0, dimension_names=[WRITER, "progress_field"],
                                      attributes={"fields": list(PROGRESS_FIELDS)})
        progress[:] = 0
        # group attrs last: a store without them is recognisably partial
        group.attrs.update({**attrs, "complete": False, "writers": writers, "region_tokens": region_tokens,
                            "chunk_tokens": chunk_tokens})
        return cls(path, group, layout, writer)

    @classmethod
    def open_for_append(cls, path: str | Path, attrs: dict[str, Any], layout: Layout, *, writer: int = 0) -> TraceStore:
        """Reopen a store to continue it; refuses one written for another model, checkpoint, schema or layout."""
        path = Path(path)
        group = _open_group(path, mode="r+")
        found: dict[str, Any] = dict(group.attrs)
        _check_attrs(path, found)
        check_version(str(found["schema_version"]))
        for key in _IDENTITY_ATTRS:
            if found.get(key) != attrs.get(key):
                raise TraceStoreError(f"{path} holds a trace of another {_what(key)}; "
                                      f"refusing to append (store: {_short(found.get(key))}, "
                                      f"this run: {_short(attrs.get(key))})")
        if not 0 <= writer < int(found["writers"]):
            raise TraceStoreError(f"{path} has {found['writers']} writer regions; writer {writer} does not exist")
        missing = [n for n in (*layout.names(), PROGRESS) if n not in group]
        if missing:
            raise TraceStoreError(f"{path} is a partial store: arrays {missing} are missing")
        store = cls(path, group, layout, writer)
        if bool(np.asarray(store.progress[writer])[2]):
            raise TraceStoreError(f"{path}: writer {writer} already finished this store ({store.tokens} tokens)")
        _remove_partials(path)
        return store

    # ------------------------------------------------------------------ writing
    def append(self, batch: dict[str, np.ndarray], windows: int) -> None:
        """Write one batch of N tokens (`windows` forward windows), then commit it; all or nothing on disk."""
        n = len(batch["token_id"])
        missing = [k for k in self.arrays if k not in batch]
        if missing:
            raise SchemaError(f"batch lacks {missing}")
        start = self.writer * self.region_tokens + self.tokens
        end = start + n
        try:
            self._ensure_capacity(end)
            for name, arr in self.arrays.items():
                data = batch[name]
                if data.shape[1:] != arr.shape[1:] or len(data) != n:
                    raise SchemaError(f"batch {name} has shape {data.shape}, store expects [{n}, *{arr.shape[1:]}]")
                self._write(name, start, end, data)
            self._commit(self.tokens + n, self.seqs + windows, done=False)
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise OSError(e.errno, f"writing tokens {self.tokens}..{self.tokens + n} of {self.path} failed "
                                   f"({why}); the store keeps its {self.tokens} committed tokens, rerun with "
                                   "--resume once fixed") from e
        self.tokens += n
        self.seqs += windows

    def _write(self, name: str, start: int, end: int, data: np.ndarray) -> None:
        self.arrays[name][start:end] = data

    def _commit(self, tokens: int, seqs: int, done: bool) -> None:
        self.progress[self.writer] = np.array([tokens, seqs, int(done)], dtype=np.int64)

    def _ensure_capacity(self, end: int) -> None:
        if self.writers > 1:
            if end > (self.writer + 1) * self.region_tokens:
                raise TraceStoreError(f"writer {self.writer}'s region of {self.region_tokens} tokens is full")
            return
        have = min(a.shape[0] for a in self.arrays.values())
        if end <= have:
            return
        new = max(end, 2 * have)
        new = -(-new // self.chunk_tokens) * self.chunk_tokens
        for arr in self.arrays.values():
            arr.resize((new, *arr.shape[1:]))

    def close(self, complete: bool = True) -> None:
        """Mark this writer done; a single writer also trims the arrays so plain readers see exactly the trace."""
        if not complete:
            return
        if self.writers == 1:
            for arr in self.arrays.values():
                if arr.shape[0] != self.tokens:
                    arr.resize((self.tokens, *arr.shape[1:]))
        self._commit(self.tokens, self.seqs, done=True)
        rows = np.asarray(self.progress[:])
        if rows[:, 2].all():
            self.group.attrs["complete"] = True

    def last_window(self) -> np.ndarray:
        """Token ids of the last committed window (resume checks the input still starts the same way)."""
        if self.tokens == 0:
            return np.empty(0, dtype=np.int32)
        base = self.writer * self.region_tokens
        lo = max(base, base + self.tokens - 65536)
        seq = np.asarray(self.arrays["seq"][lo:base + self.tokens])
        ids = np.asarray(self.arrays["token_id"][lo:base + self.tokens])
        return ids[seq == seq[-1]]


# ---------------------------------------------------------------------- reading
def open_trace(path: str | Path) -> xr.Dataset:
    """A lazy (dask-backed) Dataset of every committed token of a trace store, any writer, any schema 1.x.

    attrs["complete"] says whether every writer finished; an interrupted run opens with what it committed.
    """
    path = Path(path)
    group = _open_group(path, mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    _check_attrs(path, attrs)
    check_version(str(attrs["schema_version"]))
    try:
        layout = Layout.from_json(json.loads(attrs["layout"]))
        progress = np.asarray(_array(group, PROGRESS)[:])  # [writers, fields]
        writers, region = int(attrs["writers"]), int(attrs["region_tokens"])
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise TraceStoreError(f"{path} is a corrupt trace store ({e!r})") from None
    if progress.shape[0] != writers:
        raise TraceStoreError(f"{path}: progress has {progress.shape[0]} rows for {writers} writers")
    arrays: dict[str, tuple[tuple[str, ...], Any]] = {}
    missing = [n for n in layout.names() if n not in group]
    if missing:
        raise TraceStoreError(f"{path} is a partial store: arrays {missing} are missing")
    for name, arr in group.arrays():
        if name in (*_AXES, PROGRESS):
            continue
        dims = tuple(arr.metadata.dimension_names or ())  # type: ignore[union-attr]
        if not dims or dims[0] != TOKEN:
            continue
        lazy = da.from_zarr(arr)
        parts = [lazy[w * region: w * region + int(progress[w, 0])] for w in range(writers)]
        for w, n in enumerate(progress[:, 0]):
            if w * region + int(n) > arr.shape[0]:
                raise TraceStoreError(f"{path}: array {name} holds {arr.shape[0]} rows, writer {w} committed "
                                      f"{w * region + int(n)}; the store is corrupt")
        arrays[name] = (dims, parts[0] if writers == 1 else da.concatenate(parts))
    attrs["complete"] = bool(progress[:, 2].all())
    attrs["committed_tokens"] = int(progress[:, 0].sum())
    return build_dataset(arrays, layout, attrs)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise TraceStoreError(f"{name} in the trace store is a group, expected an array")
    return arr


def _open_group(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise FileNotFoundError(f"no trace store at {path}")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as e:  # zarr raises a zoo of types for a missing or garbled zarr.json
        raise TraceStoreError(f"{path} is not a readable zarr v3 trace store ({type(e).__name__}: {e})") from None
    return group


def _check_attrs(path: Path, attrs: dict[str, Any]) -> None:
    needed = ("schema_version", "layout", "writers", "region_tokens", "chunk_tokens", "model_config")
    missing = [k for k in needed if k not in attrs]
    if missing:
        raise TraceStoreError(f"{path} is not a complete trace store (attrs {missing} missing); it was probably "
                              "killed while being created, delete it and start again")


def _remove_partials(path: Path) -> None:
    """Temporary files a killed writer left behind (zarr writes `<chunk>.<uuid>.partial` and renames)."""
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".partial"):
                Path(root, f).unlink(missing_ok=True)


def _what(key: str) -> str:
    return {"model_config": "model (config differs)", "checkpoint": "checkpoint (digest differs)",
            "layout": "selection of sites (variables or axes differ)"}.get(key, key)


def _short(value: Any, n: int = 80) -> str:
    s = str(value)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------- vLLM routed experts
def to_vllm_routed_experts(ds: xr.Dataset) -> np.ndarray:
    """The chosen experts as vLLM returns them with --enable-return-routed-experts: int16 [N, L, k].

    Pass one request's tokens (e.g. `ds.where(ds.seq == s, drop=True)`) to get that request's array.
    """
    ids = np.asarray(ds["expert_ids"].transpose(TOKEN, LAYER, "slot").values, dtype=np.int16)  # [N, L, k]
    if (ids < 0).any():
        layers = sorted({int(ds[LAYER].values[i]) for i in np.nonzero((ids < 0).any(axis=(0, 2)))[0]})
        raise ValueError(f"expert_ids of layers {layers} were not captured; vLLM's array needs every MoE layer")
    return ids


def from_vllm_routed_experts(routed: np.ndarray, *, moe_layers: Sequence[int] | None = None,
                             token_ids: Sequence[int] | None = None, n_experts: int | None = None) -> xr.Dataset:
    """vLLM's routed-experts array [N, L, k] -> a trace Dataset holding `expert_ids` (weights are not in it)."""
    routed = np.asarray(routed)
    if routed.ndim != 3:
        raise ValueError(f"vLLM routed experts must be [tokens, moe_layers, top_k], got shape {routed.shape}")
    N, L, k = routed.shape
    layers = tuple(moe_layers) if moe_layers is not None else tuple(range(L))
    if len(layers) != L:
        raise ValueError(f"moe_layers has {len(layers)} entries, the array has {L} layers")
    if token_ids is not None and len(token_ids) != N:
        raise ValueError(f"token_ids has {len(token_ids)} entries, the array has {N} tokens")
    E = int(n_experts) if n_experts is not None else int(routed.max(initial=-1)) + 1
    layout = Layout(("expert_ids",), layers, max(layers, default=-1) + 1, k, E, 0, ())
    minus = np.full(N, -1, dtype=np.int32)
    arrays: dict[str, tuple[tuple[str, ...], Any]] = {
        "token_id": ((TOKEN,), np.asarray(token_ids, dtype=np.int32) if token_ids is not None else minus),
        "doc": ((TOKEN,), np.zeros(N, dtype=np.int32)), "seq": ((TOKEN,), np.zeros(N, dtype=np.int32)),
        "pos": ((TOKEN,), np.arange(N, dtype=np.int32)), "text": ((TOKEN,), np.full(N, "", dtype=object)),
        "expert_ids": (BY_NAME["expert_ids"].dims, routed.astype(np.int16)),
    }
    return build_dataset(arrays, layout, {"schema_version": SCHEMA_VERSION, "source": "vllm routed_experts",
                                          "complete": True})
