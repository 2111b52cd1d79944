"""vLLM's routed-experts array (int16 [tokens, moe_layers, top_k], what --enable-return-routed-experts gives)
to and from trace Datasets. Whole requests in any released format (split, merged, base64, SGLang's) are read by
routing_import.py; this module converts one array."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from workbench.trace.routing_import import Where, decode_routed_experts, normalize_routed_experts
from workbench.trace.schema import BY_NAME, LAYER, TOKEN, Layout, build_dataset


def to_vllm_routed_experts(ds: xr.Dataset, *, allow_uncaptured: bool = False) -> np.ndarray:
    """The chosen experts as vLLM returns them with --enable-return-routed-experts: int16 [N, L, k].

    Pass one request's tokens (e.g. `ds.where(ds.seq == s, drop=True)`) to get that request's array.
    `allow_uncaptured`: keep -1 where nothing was captured (as vLLM 0.21 marks prefix-cached positions) instead of
    refusing a trace that lacks a layer.
    """
    ids = np.asarray(ds["expert_ids"].transpose(TOKEN, LAYER, "slot").values, dtype=np.int16)  # [N, L, k]
    if not allow_uncaptured and (ids < 0).any():
        layers = sorted({int(ds[LAYER].values[i]) for i in np.nonzero((ids < 0).any(axis=(0, 2)))[0]})
        raise ValueError(f"expert_ids of layers {layers} were not captured; vLLM's array needs every MoE layer")
    return ids


def from_vllm_routed_experts(routed: Any, *, moe_layers: Sequence[int] | None = None,
                             token_ids: Sequence[int] | None = None, n_experts: int | None = None,
                             n_layers: int | None = None, top_k: int | None = None) -> xr.Dataset:
    """vLLM's routed-experts array [N, L, k] -> a trace Dataset holding `expert_ids` (weights are not in it).

    `routed` may be numpy, JSON lists, a base64 `.npy` string (vLLM >= 0.22) or None (a preempted request: all -1,
    sized by token_ids, moe_layers and top_k). With `n_layers` (num_hidden_layers), `moe_layers` and `n_experts`
    the array is checked against the model as `workbench import-routing` checks it, and an all-layers axis (vLLM
    0.20.x, dense layers as zero placeholders) keeps only the MoE layers.
    """
    where, name = Where("<array>", 0), "routed_experts"
    decoded = decode_routed_experts(routed, where, name)
    if decoded is None:
        if token_ids is None or moe_layers is None or top_k is None:
            raise ValueError("routed_experts is None (a preempted request): pass token_ids, moe_layers and top_k to "
                             "size its all -1 result")
        decoded = np.full((len(token_ids), len(tuple(moe_layers)), top_k), -1, dtype=np.int16)
    if decoded.ndim != 3:
        raise ValueError(f"vLLM routed experts must be [tokens, moe_layers, top_k], got shape {decoded.shape}")
    layers = tuple(moe_layers) if moe_layers is not None else tuple(range(decoded.shape[1]))
    k = int(top_k) if top_k is not None else int(decoded.shape[2])
    if n_layers is not None and moe_layers is not None and n_experts is not None:
        check = Layout(("expert_ids",), layers, int(n_layers), k, int(n_experts), 0, ())
        ids = normalize_routed_experts(decoded, check, where, name)  # [N, L, k]
    elif len(layers) != decoded.shape[1]:
        raise ValueError(f"moe_layers has {len(layers)} entries, the array has {decoded.shape[1]} layers")
    elif decoded.shape[2] != k:
        raise ValueError(f"the array has top_k {decoded.shape[2]}, expected {k}")
    else:
        ids = decoded.astype(np.int16)
    return _dataset(ids, layers, token_ids, n_experts, n_layers)


def _dataset(ids: np.ndarray, layers: tuple[int, ...], token_ids: Sequence[int] | None, n_experts: int | None,
             n_layers: int | None) -> xr.Dataset:
    """ids [N, L, k] int16 -> the Dataset (one request: doc = seq = 0, pos = 0..N-1)."""
    N, _, k = ids.shape
    if token_ids is not None and len(token_ids) != N:
        raise ValueError(f"token_ids has {len(token_ids)} entries, the array has {N} tokens")
    E = int(n_experts) if n_experts is not None else int(ids.max(initial=-1)) + 1
    A = n_layers if n_layers is not None else max(layers, default=-1) + 1
    layout = Layout(("expert_ids",), layers, A, k, E, 0, ())
    minus = np.full(N, -1, dtype=np.int32)
    arrays: dict[str, tuple[tuple[str, ...], Any]] = {
        "token_id": ((TOKEN,), np.asarray(token_ids, dtype=np.int32) if token_ids is not None else minus),
        "doc": ((TOKEN,), np.zeros(N, dtype=np.int32)), "seq": ((TOKEN,), np.zeros(N, dtype=np.int32)),
        "pos": ((TOKEN,), np.arange(N, dtype=np.int32)), "text": ((TOKEN,), np.full(N, "", dtype=object)),
        "expert_ids": (BY_NAME["expert_ids"].dims, ids),
    }
    return build_dataset(arrays, layout, {"schema_version": layout.schema_version(), "source": "vllm routed_experts",
                                          "complete": True})
