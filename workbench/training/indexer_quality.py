"""Does the trained lightning indexer pick what dense attention would read? Its recall of dense attention's own
top-k, per indexer layer, on held-out text, next to two selections that need no indexer.

The indexer of a V3.2 / V4 layer keeps `index_topk` keys (V3.2) or compressed entries (V4) per query; attention
then reads only those. `analysis.indexer_recall` measures the share of dense attention's top-k (the same weights
run with every causal entry kept, `trace.dense_topk.dense_attention_topk`) that the indexer kept. Baselines through
the very same function, on the very same queries:
- recency: the k most recent complete entries (what a bigger window would read);
- chance: k random entries of the n complete ones, whose expected recall is k / n per query.
Shape legend: W windows, S tokens per window, N = W*S queries, I indexer layers, k index_topk.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from workbench import analysis
from workbench.model.transformer import DeepSeekModel
from workbench.trace.dense_topk import dense_attention_topk
from workbench.trace.recorder import trace as record_trace


def recency_selection(ds: xr.Dataset) -> np.ndarray:
    """int32 [N, I, k]: per query the k most recent complete entries of each indexer layer (keys on V3.2), -1 pad."""
    sel = ds["index_selected"].transpose("token", "index_layer", "index_k")
    N, I, k = sel.shape
    ratios = np.asarray(ds["compress_ratio"].sel(layer_all=ds["index_layer"].values).values)  # [I]
    pos = np.asarray(ds["pos"].values)  # [N]
    out = np.full((N, I, k), -1, dtype=np.int32)
    for i, m in enumerate(ratios):
        seen = (pos + 1) // (int(m) if m > 0 else 1)  # [N] complete entries (V3.2: keys s <= pos)
        picks = seen[:, None] - 1 - np.arange(k)[None, :]  # [N, k] newest first
        out[:, i] = np.where(picks >= 0, picks, -1)
    return out


def chance_recall(ds: xr.Dataset) -> np.ndarray:
    """float [I]: the expected recall of k random complete entries, k / n averaged over the queries where the
    indexer chooses (n > k), as `analysis.indexer_recall` averages its `recall`."""
    k = int(ds.sizes["index_k"])
    ratios = np.asarray(ds["compress_ratio"].sel(layer_all=ds["index_layer"].values).values)  # [I]
    pos = np.asarray(ds["pos"].values)  # [N]
    out = []
    for m in ratios:
        seen = (pos + 1) // (int(m) if m > 0 else 1)  # [N]
        choosing = seen[seen > k]
        out.append(float(np.mean(k / choosing)) if choosing.size else float("nan"))
    return np.asarray(out)


@torch.no_grad()
def indexer_recall_table(model: DeepSeekModel, windows: torch.Tensor) -> list[dict[str, float]]:
    """Per indexer layer of `model` on token windows [W, S]: recall of the indexer, of recency and of chance, and
    the number of queries where the indexer chooses."""
    if not model.config.index_topk:
        raise ValueError("this model has no lightning indexer (DeepSeek-V3.2 and V4 have one)")
    with record_trace(model, sites=["index_selected"]) as t:
        model(windows)
    ds = t.to_xarray()
    dense = dense_attention_topk(model, windows)  # [N, I, k]
    ours = analysis.indexer_recall(ds, dense)
    recent = analysis.indexer_recall(ds.assign(index_selected=(ds["index_selected"].dims, recency_selection(ds))),
                                     dense)
    chance = chance_recall(ds)
    layers = [int(v) for v in ds["index_layer"].values]
    ratios = ds["compress_ratio"].sel(layer_all=layers).values
    return [{"layer": layer, "compress_ratio": int(m), "recall": float(ours.recall.values[i]),
             "recency": float(recent.recall.values[i]), "chance": float(chance[i]),
             "queries": int(ours.queries.values[i])} for i, (layer, m) in enumerate(zip(layers, ratios, strict=True))]


def held_out_windows(tokenizer: object, docs: Sequence[object], seq_len: int, n: int) -> torch.Tensor:
    """[n, seq_len] held-out token windows, as the training's evaluation cuts them."""
    from workbench.training.data import eval_windows, token_stream

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t) for t in texts]  # type: ignore[attr-defined]

    stream = token_stream(docs, encode_batch, eos_id=1)  # type: ignore[arg-type]
    return eval_windows(stream, seq_len, max_windows=n)[:, :-1]


def main(argv: list[str] | None = None) -> int:
    from workbench.loader import load_model
    from workbench.training.data import load_corpus, split_corpus

    p = argparse.ArgumentParser(prog="python -m workbench.training.indexer_quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' or a checkpoint directory with tokenizer.json")
    p.add_argument("--windows", type=int, default=16, help="held-out windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (the training length)")
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    _, held = split_corpus(load_corpus())
    windows = held_out_windows(loaded.tokenizer, held, args.seq_len, args.windows)
    rows = indexer_recall_table(loaded.model, windows)
    k = loaded.model.config.index_topk
    print(f"{loaded.name} ({loaded.digest}): {windows.shape[0]} held-out windows of {windows.shape[1]} tokens, "
          f"index_topk {k}")
    print("| layer | compress ratio | indexer recall | recency | chance | queries choosing |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['compress_ratio']} | {r['recall']:.3f} | {r['recency']:.3f} | {r['chance']:.3f} "
              f"| {r['queries']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
