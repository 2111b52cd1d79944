"""Chunked reductions for the analyses: one task per token chunk, then a tree, on dask; the same function once on
numpy arrays. Dense partials are summed (`sum_blocks`); sparse ones are sorted (key, value) frames merged by key
(`merge_blocks` / `merge_graph`), so what reaches the client grows with the distinct keys, not the tokens.
Shape legend: B token chunks, m keys of a frame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

TOKEN = "token"

Frame = tuple[np.ndarray, np.ndarray]  # (keys, values) int64 [m]; a merged frame's keys are sorted and unique


def is_lazy(*arrays: xr.DataArray) -> bool:
    return any(isinstance(a.data, da.Array) for a in arrays)


def _token_blocks(arrays: Sequence[xr.DataArray]) -> list[da.Array]:
    """The arrays as dask arrays with token first, cut along token like the first lazy one and whole along the
    rest, so block b of each holds the same tokens."""
    first = next(a for a in arrays if isinstance(a.data, da.Array))
    token_chunks = first.data.chunks[first.dims.index(TOKEN)]
    out = []
    for a in arrays:
        a = a.transpose(TOKEN, ...)
        whole = (token_chunks, *a.shape[1:])
        out.append(a.data.rechunk(whole) if isinstance(a.data, da.Array) else da.from_array(np.asarray(a.data), whole))
    return out


def _blockwise(fn: Callable[..., Any], blocks: list[da.Array], shape: tuple[int, ...], dtype: Any) -> da.Array:
    """One task per token chunk: fn(block_b of each array) as block b, with a leading axis of length 1, of a
    [B, *shape] array (object [B] of frame tuples when fn returns frames)."""
    out_ind = ("t", *(f"out{i}" for i in range(len(shape))))
    args: list[Any] = []
    for j, b in enumerate(blocks):
        args += [b, ("t", *(f"in{j}.{ax}" for ax in range(1, b.ndim)))]
    return da.blockwise(functools.partial(_with_leading_axis, fn), out_ind, *args,
                        new_axes={f"out{i}": s for i, s in enumerate(shape)}, adjust_chunks={"t": 1},
                        concatenate=True, dtype=dtype, meta=np.empty((0,) * (len(shape) + 1), dtype=dtype))


def _with_leading_axis(fn: Callable[..., Any], *args: Any) -> np.ndarray:
    """fn's result as one block of a chunk-indexed array: an array gets a leading axis of 1, a tuple of frames
    is boxed in an object [1]."""
    out = fn(*args)
    if isinstance(out, tuple):  # frames: one object per block
        box = np.empty(1, dtype=object)
        box[0] = out
        return box
    return np.asarray(out)[None]


def sum_blocks(fn: Callable[..., np.ndarray], arrays: list[xr.DataArray], shape: tuple[int, ...],
                dtype: Any) -> Any:
    """sum_b fn(block_b of each array) over token chunks: lazy (one task per chunk, then dask's tree sum) when any
    input is lazy, else numpy (fn once on the whole arrays)."""
    if not is_lazy(*arrays):
        return fn(*(np.asarray(a.transpose(TOKEN, ...).data) for a in arrays))
    return _blockwise(fn, _token_blocks(arrays), shape, dtype).sum(axis=0, dtype=dtype)


def _reduce_by_key(keys: np.ndarray, values: np.ndarray, op: np.ufunc) -> Frame:
    """Sorted unique keys, and op (np.add, np.minimum) over the values of each."""
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if len(keys) == 0:
        return keys.astype(np.int64), values.astype(np.int64)
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[start].astype(np.int64), op.reduceat(values, start).astype(np.int64)


def _merge_frames(parts: Sequence[tuple[Frame, ...]], ops: tuple[np.ufunc, ...]) -> tuple[Frame, ...]:
    """Merge per-chunk tuples of frames into one tuple, frame i reduced by key with ops[i]."""
    return tuple(_reduce_by_key(np.concatenate([p[i][0] for p in parts]), np.concatenate([p[i][1] for p in parts]),
                                op) for i, op in enumerate(ops))


def _combine_boxes(ops: tuple[np.ufunc, ...], boxes: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    """da.reduction's combine / aggregate: object [m] of frame tuples -> object [1] of their merge."""
    return _with_leading_axis(_merge_frames, boxes.tolist(), ops)


def _identity(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return x


def merge_graph(fn: Callable[..., tuple[Frame, ...]], arrays: list[xr.DataArray],
                 ops: tuple[np.ufunc, ...]) -> da.Array:
    """Lazy object [1] holding the merge of fn(block_b of each array) over token chunks: one task per chunk, then
    a tree merge (dask's `reduction` at its default fan-in), so only merged frames travel."""
    boxes = _blockwise(fn, _token_blocks(arrays), (), object)  # [B] object: one tuple of frames per chunk
    combine = functools.partial(_combine_boxes, ops)
    return da.reduction(boxes, _identity, combine, combine=combine, axis=0, keepdims=True, dtype=object,
                        concatenate=True, meta=np.empty(0, dtype=object))


def merge_blocks(fn: Callable[..., tuple[Frame, ...]], arrays: list[xr.DataArray],
                  ops: tuple[np.ufunc, ...]) -> tuple[Frame, ...]:
    """fn(block_b of each array) -> frames, merged by key over token chunks with `ops` (frame i with ops[i]),
    computed: on the cluster for lazy inputs (the client receives only the merged frames), fn once on the whole
    arrays for numpy ones."""
    if not is_lazy(*arrays):
        return _merge_frames([fn(*(np.asarray(a.transpose(TOKEN, ...).data) for a in arrays))], ops)
    return merge_graph(fn, arrays, ops).compute()[0]


def concat_frames(frames: Sequence[Frame]) -> Frame:
    """Frames with disjoint or repeated keys side by side (merged later by key)."""
    if not frames:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate([f[0] for f in frames]), np.concatenate([f[1] for f in frames])


def token_positions(a: xr.DataArray) -> xr.DataArray:
    """0 .. N-1 along token, chunked like `a` (a chunk's task knows its tokens' global positions from it)."""
    n = a.sizes[TOKEN]
    if isinstance(a.data, da.Array):
        return xr.DataArray(da.arange(n, chunks=(a.data.chunks[a.dims.index(TOKEN)],), dtype=np.int64), dims=TOKEN)
    return xr.DataArray(np.arange(n, dtype=np.int64), dims=TOKEN)
