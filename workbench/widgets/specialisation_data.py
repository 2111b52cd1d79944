"""Small pure functions behind the specialisation view, on top of `workbench.analysis`: one expert's preferred
tokens, its occurrences in context, and its co-activation partners.
Shape legend: N tokens, L MoE layers, k top-k, E routed experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr


def check_layer_expert(ds: xr.Dataset, layer: int, expert: int, n_experts: int) -> int:
    """Index of `layer` on the trace's MoE-layer axis; ValueError naming the bad layer or expert."""
    layers = [int(x) for x in ds["layer"].values]
    if isinstance(layer, bool) or layer not in layers:
        raise ValueError(f"layer {layer!r} is not a MoE layer of this trace; its MoE layers are {layers}")
    if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not 0 <= expert < n_experts:
        raise ValueError(f"expert {expert!r} is outside 0..{n_experts - 1}")
    return layers.index(layer)


def preferred_tokens(top: xr.Dataset, layer: int, expert: int, token_text: Callable[[int], str]) -> list[dict[str, Any]]:
    """Rows of `analysis.top_tokens_per_expert` for one (layer, expert), best lift first; empty ranks dropped."""
    row = top.sel(layer=layer).isel(expert=expert)
    out = []
    for tok, lift, count in zip(row["token_id"].values.tolist(), row["lift"].values.tolist(),
                                row["count"].values.tolist(), strict=True):
        if tok >= 0:
            out.append({"token_id": int(tok), "text": token_text(int(tok)), "lift": float(lift), "count": int(count)})
    return out


def coactivation_partners(coact: xr.Dataset, layer: int, expert: int, n: int = 5) -> list[dict[str, Any]]:
    """The `n` experts most often chosen together with `expert` in `layer` (same token), by count then lift."""
    count = np.asarray(coact["count"].sel(layer=layer).values)[expert]  # [E]
    lift = np.asarray(coact["lift"].sel(layer=layer).values)[expert]  # [E]
    order = [int(e) for e in np.lexsort((-np.nan_to_num(lift), -count)) if e != expert and count[e] > 0]
    return [{"expert": e, "count": int(count[e]), "lift": float(lift[e])} for e in order[:n]]


def examples_in_context(ds: xr.Dataset, layer: int, expert: int, *, n: int = 5, window: int = 6,
                        chunk: int = 65536) -> list[dict[str, Any]]:
    """The first `n` tokens routed to `expert` in `layer`, each with up to `window` tokens either side from the same
    sequence; reads the trace a chunk at a time and stops once it has `n`."""
    li = [int(x) for x in ds["layer"].values].index(layer)
    N = int(ds.sizes["token"])
    hits: list[int] = []
    for lo in range(0, N, chunk):
        ids = np.asarray(ds["expert_ids"].isel(token=slice(lo, lo + chunk), layer=li).values)  # [n, k]
        hits.extend((lo + np.nonzero((ids == expert).any(axis=1))[0]).tolist())
        if len(hits) >= n:
            break
    out = []
    for t in hits[:n]:
        lo, hi = max(0, t - window), min(N, t + window + 1)
        part = ds.isel(token=slice(lo, hi))
        seq = np.asarray(part["seq"].values)
        text = [str(x) for x in np.asarray(part["text"].values).tolist()]
        same = seq == seq[t - lo]
        slot = np.asarray(ds["expert_ids"].isel(token=t, layer=li).values).tolist().index(expert)
        weight = (float(ds["expert_weights"].isel(token=t, layer=li, slot=slot).values)
                  if "expert_weights" in ds else float("nan"))
        out.append({"token": t, "before": "".join(x for x, s in zip(text[: t - lo], same[: t - lo], strict=True) if s),
                    "text": text[t - lo],
                    "after": "".join(x for x, s in zip(text[t - lo + 1:], same[t - lo + 1:], strict=True) if s),
                    "slot": slot, "weight": weight})
    return out
