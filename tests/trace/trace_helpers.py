"""Helpers shared by the trace tests (a plain module: `conftest` is not meant to be imported)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from workbench.loader import LoadedModel
from workbench.trace import Trace, TraceStore

WORDS = ["the", "expert", "routes", "a", "token", "to", "latent", "space", "while", "loss", "falls", "and", "weights", "scale"]


def corpus(n: int, seed: int = 0, max_words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def run_windows(t: Trace, texts: list[str], tokenizer: object, per_batch: int = 3, seq0: int = 0):
    """Yield (batch, windows) for texts forwarded `per_batch` at a time, right-padded, BOS first."""
    seq = seq0
    for i in range(0, len(texts), per_batch):
        chunk = [[0, *tokenizer.encode(s)] for s in texts[i:i + per_batch]]  # type: ignore[attr-defined]
        lengths = [len(c) for c in chunk]
        ids = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
        for j, c in enumerate(chunk):
            ids[j, : len(c)] = torch.tensor(c)
        yield t.forward(ids, lengths, seq=range(seq, seq + len(chunk)), doc=range(seq, seq + len(chunk))), len(chunk)
        seq += len(chunk)


def write_store(path: Path, loaded: LoadedModel, texts: list[str], sites: list[str] | None = None,
                chunk_tokens: int = 32, close: bool = True) -> TraceStore:
    t = Trace(loaded.model, sites, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=chunk_tokens, vocab=t.vocab())
    with t:
        for batch, n in run_windows(t, texts, loaded.tokenizer):
            store.append(batch, windows=n)
    store.close(complete=close)  # commits every batch; close=False leaves it unfinished, as a stopped run would
    return store


def in_memory(loaded, texts, sites=None):
    t = Trace(loaded.model, sites, tokenizer=loaded.tokenizer, checkpoint=loaded.digest)
    with t:
        for _ in run_windows(t, texts, loaded.tokenizer):
            pass
    return t.to_xarray()


def assert_same_trace(a: xr.Dataset, b: xr.Dataset) -> None:
    assert set(a.variables) - {"progress"} == set(b.variables) - {"progress"}
    for name in a.variables:
        if name == "progress":
            continue
        va, vb = np.asarray(a[name].values), np.asarray(b[name].values)
        if va.dtype.kind in "OTU" or vb.dtype.kind in "OTU":
            assert [str(x) for x in va] == [str(x) for x in vb], name
        else:
            np.testing.assert_array_equal(va, vb, err_msg=name)
