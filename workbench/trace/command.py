"""Trace a corpus into a zarr trace store: `workbench trace --input FILE --out STORE.zarr [--resume]`.

Design choices:
- The input is streamed record by record (.txt: one record per non-empty line; .jsonl: one object with a
  "text" field per line), cut into windows of at most --max-seq-len tokens, and packed greedily into batches of
  about --batch-tokens tokens; only one batch is ever in memory, so memory stays flat on any input size.
- The window stream is a pure function of the input and the flags, and each batch is one commit, so --resume
  skips exactly the committed windows and rebuilds the same batches an uninterrupted run would have built
  (same padding, hence bit-identical numbers). It checks that the last committed window still matches the
  input before writing anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from workbench.loader import load_model
from workbench.trace.recorder import Trace
from workbench.trace.store import DEFAULT_CHUNK_TOKENS, TraceStore

Window = tuple[int, list[int]]  # (input record index, token ids)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a preset name, or a checkpoint directory")
    p.add_argument("--input", required=True, type=Path, help=".txt (a record per line) or .jsonl ('text' field)")
    p.add_argument("--out", required=True, type=Path, help="the zarr trace store to create (or continue)")
    p.add_argument("--sites", nargs="+", default=None,
                   help="variables (expert_ids, router_scores, kv_latent, ...), probe sites or globs, or 'all'; "
                        "default: routing + latent norms (+ FP8 errors when simulated)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch and per commit")
    p.add_argument("--max-seq-len", type=int, default=512, help="longer records are cut into windows of this many")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="zarr chunk length along token")
    p.add_argument("--resume", action="store_true", help="continue an interrupted store instead of refusing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def iter_windows(path: Path, tokenizer: object, max_len: int, bos: int | None) -> Iterator[Window]:
    """Stream (record index, window token ids) from a .txt or .jsonl file."""
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8") as f:
        record = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
            else:
                text = line.rstrip("\n")
            ids = ([bos] if bos is not None else []) + tokenizer.encode(text)  # type: ignore[attr-defined]
            for start in range(0, len(ids), max_len):
                yield record, ids[start:start + max_len]
            record += 1


def iter_batches(windows: Iterator[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Greedy packing: add windows while the batch stays within batch_tokens (always at least one)."""
    batch: list[Window] = []
    size = 0
    for w in windows:
        if batch and size + len(w[1]) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(w)
        size += len(w[1])
    if batch:
        yield batch


def _check_input(path: Path) -> None:
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--input {path}: expected a .txt or .jsonl file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"--input {path}: cannot read it ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    _check_input(args.input)
    if args.batch_tokens < 1 or args.max_seq_len < 1:
        raise ValueError("--batch-tokens and --max-seq-len must be positive")
    loaded = load_model(args.model)
    model, cfg = loaded.model, loaded.model.config
    if args.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    t = Trace(model, args.sites, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    attrs = t.attrs()
    if args.resume and args.out.exists():
        store = TraceStore.open_for_append(args.out, attrs, t.layout)
    else:
        store = TraceStore.create(args.out, attrs, t.layout, chunk_tokens=args.chunk_tokens)
    windows = iter_windows(args.input, loaded.tokenizer, args.max_seq_len, cfg.bos_token_id)
    if store.seqs:
        done = list(islice(windows, store.seqs - 1))
        last = next(windows, None)
        if len(done) != store.seqs - 1 or last is None or last[1] != store.last_window().tolist():
            raise ValueError(f"--resume: {args.input} does not start with the {store.seqs} windows already in "
                             f"{args.out}; the input or --max-seq-len changed")
        del done
    from tqdm import tqdm

    bar = tqdm(initial=store.tokens, unit="tok", unit_scale=True, desc="trace", disable=args.no_progress,
               file=sys.stderr)
    seq = store.seqs
    try:
        with t, torch.inference_mode():
            for batch in iter_batches(windows, args.batch_tokens):
                lengths = [len(ids) for _, ids in batch]
                padded = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # [B, S] right-padded
                for i, (_, ids) in enumerate(batch):
                    padded[i, : len(ids)] = torch.tensor(ids)
                record = t.forward(padded, lengths, seq=range(seq, seq + len(batch)), doc=[d for d, _ in batch])
                store.append(record, windows=len(batch))
                seq += len(batch)
                bar.update(sum(lengths))
    except OSError as e:
        bar.close()
        print(f"workbench trace: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print(f"workbench trace: interrupted; {store.tokens} tokens committed, rerun with --resume", file=sys.stderr)
        return 130
    bar.close()
    store.close()
    total = int(np.asarray(store.tokens))
    print(f"traced {total} tokens in {store.seqs} windows to {args.out} ({', '.join(t.layout.variables)})")
    return 0
