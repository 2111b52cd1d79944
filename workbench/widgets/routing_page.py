"""What the routing grid sends to the browser: one page of tokens plus per-layer aggregates, never the whole trace.

Bound: a page carries `page_tokens` x L x k expert ids and weights and `page_tokens` token texts; the aggregates are
the [L, E] expert loads over the whole source. So the payload is O(page_tokens·L·k + L·E) whatever the trace's
length; a 100k-token trace costs the browser what a 256-token one does (benchmarks/bench_ui.py prints the bytes).
DeepSeek-V4's hash-routed layers (experts = tid2eid[token id], no gate) are named in `hash_layers`, with the page's
token ids so the grid can say which row of tid2eid a token used; every other page has `hash_layers: []` and no ids.
Shape legend: N tokens in the source, n on the page, L MoE layers, k top-k, E routed experts.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import xarray as xr

from workbench import analysis

DEFAULT_PAGE_TOKENS = 256


def n_pages(n_tokens: int, page_tokens: int) -> int:
    return max(1, math.ceil(n_tokens / page_tokens))


def load_per_layer(ds: xr.Dataset) -> np.ndarray:
    """Expert load [L, E] over the whole source (chunk by chunk on a lazy store)."""
    load = analysis.expert_load(ds)
    return np.asarray(load.data.compute() if hasattr(load.data, "compute") else load.data, dtype=np.int64)


def _finite_or_none(values: np.ndarray, decimals: int) -> list[float | None]:
    rounded = np.round(values.astype(np.float64), decimals)
    return [None if not math.isfinite(v) else v for v in rounded.tolist()]


def hash_routed_layers(ds: xr.Dataset) -> list[int]:
    """The MoE layers a trace records as hash-routed: its `hash_routed` coordinate, else the `hash_layers` of its
    layout attr; [] for a trace that has neither (V2/V3, or a store older than schema 1.2)."""
    if "hash_routed" in ds.coords:
        flags = np.asarray(ds["hash_routed"].values, dtype=bool)
        return [int(layer) for layer, hashed in zip(ds["layer"].values, flags, strict=True) if hashed]
    try:
        layout = json.loads(ds.attrs.get("layout", "{}"))
    except (TypeError, ValueError):
        return []
    return sorted(int(i) for i in layout.get("hash_layers", [])) if isinstance(layout, dict) else []


def routing_page(ds: xr.Dataset, page: int, *, page_tokens: int = DEFAULT_PAGE_TOKENS, load: np.ndarray | None = None,
                 source: str = "trace", hash_layers: list[int] | None = None) -> dict[str, Any]:
    """The grid's data for page `page` of `ds` (JSON-ready; NaN weights become null). `hash_layers`: the hash-routed
    MoE layers (default: what the trace records, `hash_routed_layers`)."""
    if isinstance(page_tokens, bool) or not isinstance(page_tokens, (int, np.integer)) or page_tokens < 1:
        raise ValueError(f"page_tokens must be an int >= 1, got {page_tokens!r}")
    N = int(ds.sizes["token"])
    pages = n_pages(N, page_tokens)
    if isinstance(page, bool) or not isinstance(page, (int, np.integer)) or not 0 <= page < pages:
        raise ValueError(f"page {page!r} is outside 0..{pages - 1} ({N} tokens, {page_tokens} per page)")
    start, stop = int(page) * page_tokens, min(N, (int(page) + 1) * page_tokens)
    part = ds.isel(token=slice(start, stop))
    ids = np.asarray(part["expert_ids"].transpose("token", "layer", "slot").values)  # [n, L, k]
    if "expert_weights" in part:
        weights = np.asarray(part["expert_weights"].transpose("token", "layer", "slot").values)  # [n, L, k]
    else:
        weights = np.full(ids.shape, np.nan, dtype=np.float32)
    E = analysis.n_experts(ds)
    if load is None:
        load = load_per_layer(ds)
    text = [str(t) for t in np.asarray(part["text"].values).tolist()] if "text" in part else [""] * len(ids)
    layers = [int(x) for x in ds["layer"].values]
    hashed = hash_routed_layers(ds) if hash_layers is None else [int(i) for i in hash_layers]
    unknown = sorted(set(hashed) - set(layers))
    if unknown:
        raise ValueError(f"hash_layers {unknown} are not MoE layers of this source ({layers})")
    extra: dict[str, Any] = {}
    if hashed and "token_id" in part:
        extra["token_ids"] = np.asarray(part["token_id"].values, dtype=np.int64).tolist()  # [n]
    return {
        "source": source, "start": start, "n_total": N, "page": int(page), "n_pages": pages,
        "layers": layers, "n_experts": E, "top_k": int(ids.shape[2]), "hash_layers": sorted(hashed),
        "text": text,
        "expert_ids": ids.astype(np.int64).reshape(-1).tolist(),  # [n*L*k] token-major
        "weights": _finite_or_none(weights.reshape(-1), 4),  # [n*L*k]
        "load": np.asarray(load, dtype=np.int64).reshape(-1).tolist(),  # [L*E]
        **extra,
    }


def token_choices(ds: xr.Dataset, token: int) -> list[dict[str, Any]]:
    """Top-k experts and weights of one token in every MoE layer: [{layer, experts, weights}]."""
    N = int(ds.sizes["token"])
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < N:
        raise ValueError(f"token {token!r} is outside 0..{N - 1}")
    one = ds.isel(token=int(token))
    ids = np.asarray(one["expert_ids"].transpose("layer", "slot").values)  # [L, k]
    w = (np.asarray(one["expert_weights"].transpose("layer", "slot").values) if "expert_weights" in one
         else np.full(ids.shape, np.nan))
    return [{"layer": int(layer), "experts": ids[i].tolist(), "weights": _finite_or_none(w[i], 4)}
            for i, layer in enumerate(ds["layer"].values)]
