"""vLLM's routed-experts array (int16 [tokens, moe_layers, top_k], what --enable-return-routed-experts gives)
to and from trace Datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from workbench.trace.schema import BY_NAME, LAYER, TOKEN, Layout, build_dataset


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
    return build_dataset(arrays, layout, {"schema_version": layout.schema_version(), "source": "vllm routed_experts",
                                          "complete": True})
