"""The zarr plumbing shared by the trace store's writer and readers: opening a store with errors that say what
is wrong, the attribute check, and the direct chunk path (the store's own bytes + zstd chunks encoded with
numcodecs and written as files, which the writer uses because zarr's per-call cost dominated small flushes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from workbench.trace.schema import SchemaError, check_version


class TraceStoreError(SchemaError):
    """A store that is missing, corrupt, or belongs to another model or schema; nothing was written."""


def array_of(group: zarr.Group, name: str) -> zarr.Array:
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise TraceStoreError(f"{name} in the trace store is a group, expected an array")
    return arr


STORE_ATTRS = ("schema_version", "layout", "writers", "region_tokens", "chunk_tokens", "model_config")
"""The group attrs every trace store has once it is fully created (written together, in one zarr.json write)."""


def open_store(storage: Any, mode: str) -> tuple[zarr.Group, dict[str, Any]]:
    """A trace store's group and attrs (`storage`: a storage.LocalStorage or ObjectStorage), once it is known to
    be a readable, fully created store of a schema this version reads; every reader and writer opens stores
    through here, so each refusal reads the same. Consolidated metadata is never read: a store being written
    has none, and a consolidated copy may lag the progress rows."""
    path = storage.name
    if storage.local:
        if not storage.path.exists():
            raise FileNotFoundError(f"no trace store at {path}")
        if not storage.path.is_dir():
            raise TraceStoreError(f"{path} is a file, not a trace store (a zarr folder)")
    elif storage.get("zarr.json") is None:
        raise FileNotFoundError(f"no trace store at {path} (no zarr.json under that prefix)")
    try:
        group = zarr.open_group(storage.zarr_store, mode=mode, zarr_format=3,  # type: ignore[arg-type]
                                use_consolidated=False)
    except Exception as e:  # zarr raises a zoo of types for a missing or garbled zarr.json
        raise TraceStoreError(f"{path} is not a readable zarr v3 trace store ({type(e).__name__}: {e})") from None
    attrs: dict[str, Any] = dict(group.attrs)
    missing = [k for k in STORE_ATTRS if k not in attrs]
    if missing:
        raise TraceStoreError(f"{path} is not a complete trace store (attrs {missing} missing); it was probably "
                              "killed while being created, delete it and start again")
    check_version(str(attrs["schema_version"]), path)
    return group, attrs


def remove_partials(path: Path, owned: Callable[[str, int], bool] | None = None) -> None:
    """Temporary files a killed writer left behind (zarr writes `<chunk>.<uuid>.partial` and renames).

    `owned(array, first chunk index)`: remove only the chunk files it accepts, i.e. one writer's region of a
    store other writers may be writing right now (their in-flight temporary files must survive)."""
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".partial") and (owned is None or _owned_chunk(path, Path(root, f), owned)):
                Path(root, f).unlink(missing_ok=True)


def _owned_chunk(store: Path, file: Path, owned: Callable[[str, int], bool]) -> bool:
    """Whether a temporary chunk file `<array>/c/<i>[/<j>...].<tmp>.partial` belongs to `owned`; metadata
    files and anything else are not."""
    parts = file.relative_to(store).parts
    if len(parts) < 3 or parts[1] != "c":
        return False
    first = parts[2].split(".", 1)[0]
    return first.isdigit() and owned(parts[0], int(first))


def zstd_codec(arr: zarr.Array) -> Any:
    """numcodecs' Zstd matching the array's codecs when they are exactly bytes (little endian) + zstd with the
    default "/" chunk keys (what `TraceStore.create` makes); None otherwise (the array is written through zarr)."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    meta = arr.metadata
    codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
    if len(codecs) != 2:
        return None
    serializer, compressor = codecs
    if (not isinstance(serializer, BytesCodec) or not isinstance(compressor, ZstdCodec)
            or str(getattr(serializer.endian, "value", serializer.endian)) != "little"
            or not isinstance(getattr(meta, "chunk_key_encoding", None), DefaultChunkKeyEncoding)
            or np.dtype(arr.dtype).kind not in "iuf"):
        return None
    import numcodecs

    return numcodecs.Zstd(level=compressor.level, checksum=compressor.checksum)


def chunk_blocks(arr: zarr.Array, name: str, codec: Any, start: int, data: np.ndarray
                 ) -> list[tuple[str, Any, np.ndarray]]:
    """Rows start.. of `arr` as (store key, codec, contiguous little-endian chunk) for every chunk they cover;
    `codec` is `zstd_codec(arr)` and `start` a chunk boundary. Stored chunks always have the full chunk shape: a
    partial one is padded with the fill value, as zarr does. Encoding is left to the caller's worker threads."""
    chunks = arr.chunks
    fill = arr.metadata.fill_value
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    grid = [range(-(-n // c)) for n, c in zip(data.shape, chunks, strict=True)]
    grid[0] = range(-(-len(data) // chunks[0]))
    out = []
    first = start // chunks[0]
    for index in np.ndindex(*(len(g) for g in grid)):
        block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))]
        if block.shape != tuple(chunks):
            full = np.full(chunks, fill, dtype=dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        key = arr.metadata.encode_chunk_key((first + index[0], *index[1:]))
        out.append((f"{name}/{key}", codec, np.ascontiguousarray(block, dtype=dtype)))
    return out


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run zarr's async API to completion from synchronous code, on the event loop thread zarr's own synchronous
    API uses (so it also works under Jupyter's running loop, and worker threads are reused between flushes)."""
    sync(coro)
