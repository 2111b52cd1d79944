"""Reading trace stores: `open_trace` (a lazy, dask-backed Dataset of every committed token, any writer, any
schema 1.x) and `migrate_store` (schema 1.0 -> 1.1 in place).

`open_trace` builds the Dataset from `dask.array.from_zarr` slices of each writer's committed rows rather than
through `xarray.open_zarr`, because after a crash the arrays may have different capacities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from workbench.trace.schema import (
    LAYER,
    LAYER_ALL,
    PROGRESS,
    SCHEMA_VERSION,
    SITE,
    STORED_TEXT_VERSIONS,
    TOKEN,
    VOCAB,
    VOCAB_TEXT,
    Layout,
    build_dataset,
)
from workbench.trace.zarr_io import TraceStoreError, array_of, open_store

_AXES = (LAYER, LAYER_ALL, SITE)


def open_trace(path: str | Path) -> xr.Dataset:
    """A lazy (dask-backed) Dataset of every committed token of a trace store, any writer, any schema 1.x.

    attrs["complete"] says whether every writer finished; an interrupted run opens with what it committed.
    Variables of a newer minor version are kept as they are; optional ones a store lacks are simply absent.
    """
    path = Path(path)
    group, attrs = open_store(path, mode="r")
    try:
        layout = Layout.from_json(json.loads(attrs["layout"]))
        progress = np.asarray(array_of(group, PROGRESS)[:])  # [writers, fields]
        writers, region = int(attrs["writers"]), int(attrs["region_tokens"])
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise TraceStoreError(f"{path} is a corrupt trace store ({e!r})") from None
    if progress.shape[0] != writers:
        raise TraceStoreError(f"{path}: progress has {progress.shape[0]} rows for {writers} writers")
    arrays: dict[str, tuple[tuple[str, ...], Any]] = {}
    missing = [n for n in layout.stored_names() if n not in group]
    if missing:
        raise TraceStoreError(f"{path} is a partial store: arrays {missing} are missing")
    for name, arr in group.arrays():
        if name in (*_AXES, PROGRESS):
            continue
        dims = tuple(arr.metadata.dimension_names or ())  # type: ignore[union-attr]
        if not dims or dims[0] != TOKEN:
            continue
        for w, n in enumerate(progress[:, 0]):
            if w * region + int(n) > arr.shape[0]:
                raise TraceStoreError(f"{path}: array {name} holds {arr.shape[0]} rows, writer {w} committed "
                                      f"{w * region + int(n)}; the store is corrupt")
        lazy = da.from_zarr(arr)
        parts = [lazy[w * region: w * region + int(progress[w, 0])] for w in range(writers)]
        arrays[name] = (dims, parts[0] if writers == 1 else da.concatenate(parts))
    if "text" not in arrays:  # schema >= 1.1: text = vocab_text[token_id]
        arrays["text"] = ((TOKEN,), _derived_text(group, arrays["token_id"][1]))
    attrs["complete"] = bool(progress[:, 2].all())
    attrs["committed_tokens"] = int(progress[:, 0].sum())
    return build_dataset(arrays, layout, attrs)


def _derived_text(group: zarr.Group, token_id: da.Array) -> da.Array:
    """The `text` coordinate of a 1.1 store, lazily: vocab_text[token_id] ("" for ids outside it or no table)."""
    vocab = np.asarray(array_of(group, VOCAB_TEXT)[:], dtype=object) if VOCAB_TEXT in group else np.empty(0, object)
    table = np.append(vocab, "")  # index -1 and out-of-range ids read ""

    def lookup(ids: np.ndarray) -> np.ndarray:
        return table[np.where((ids >= 0) & (ids < len(vocab)), ids, -1)]

    return da.map_blocks(lookup, token_id, dtype=object)


def migrate_store(path: str | Path, vocab: Sequence[str] | None = None) -> str:
    """Rewrite a schema 1.0 store as 1.1 in place (per-token `text` -> one `vocab_text` table); returns the
    version it now has. `vocab` (e.g. `Trace.vocab()`) gives the text of ids the store never saw, which tokens
    appended later need; without it they read "". Safe to interrupt: the table is written first, the version
    bumped next, the per-token array removed last, and a 1.1 store that still holds `text` reads the same."""
    path = Path(path)
    group, attrs = open_store(path, mode="r+")
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
    group.attrs["schema_version"] = SCHEMA_VERSION
    del group["text"]
    return SCHEMA_VERSION
