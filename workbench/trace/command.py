"""Trace a corpus into a zarr trace store: `workbench trace --input FILE... --out STORE.zarr|s3://... [--resume]`.

Design choices:
- The input (corpus.py) is streamed record by record, cut into windows of at most --max-seq-len tokens, and
  packed greedily into batches of about --batch-tokens tokens; only one batch is ever in memory, so memory stays
  flat on any input size. Several files (or globs) are one corpus, in the order given.
- `--out` is a folder or an object-store URL (s3://bucket/run.zarr, gs://...; storage.py), with credentials and
  endpoint from the standard environment plus --storage-options.
- `--cluster local:N` / `--scheduler ADDR` run the trace as many tasks on dask.distributed (cluster.py); without
  either nothing imports dask.distributed and the run is this module's single process.
- Input errors name the file and line (bad UTF-8 included, which the text reader reports as a bare offset), and
  a run that fails before its first commit removes the store it created, so the rerun after the fix needs no
  --resume. A second writer of the same store (region) is refused by the store's writer lock (store.py).
- The window stream is a pure function of the input and the flags, and commits fall on batch boundaries, so
  --resume skips exactly the committed windows and rebuilds the same batches an uninterrupted run would have
  built (same padding, hence bit-identical numbers). It checks that the last committed window still matches the
  input before writing anything. A run that stops on an error first commits every batch it finished.
- `--shard I/N`: N processes fill one store. Each first tokenizes the whole input (cheap next to the forward)
  to cut the single-writer run's batches into N contiguous runs of about equal tokens, so every process runs
  exactly the batches a single writer would have and the store reads back equal to a single-writer run. Whoever
  gets there first creates the store (an atomic mkdir decides; on object storage a conditional PUT); the others
  wait for it and join. `--shard auto` takes I/N from torchrun's RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.loader import load_model
from workbench.trace import cluster  # imports dask.distributed only inside its functions
from workbench.trace.corpus import Window, check_input, iter_batches, iter_windows
from workbench.trace.recorder import Trace
from workbench.trace.schema import Layout
from workbench.trace.storage import ClaimedError, LocalStorage, Storage, storage_for
from workbench.trace.store import DEFAULT_CHUNK_TOKENS, REMOTE_CHUNK_TOKENS, TraceStore
from workbench.trace.zarr_io import STORE_ATTRS, TraceStoreError

_OPENED: ContextVar[list[TraceStore] | None] = ContextVar("trace_stores_opened", default=None)  # by this run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a preset name, or a checkpoint directory")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help=".txt (a record per line) or .jsonl ('text' field) files or globs, one corpus in this order")
    p.add_argument("--out", required=True, help="the zarr trace store to create (or continue): a folder or an "
                                                "object-store URL (s3://bucket/run.zarr, gs://...)")
    p.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                   help="object-store options beyond the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), "
                        'e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    p.add_argument("--sites", nargs="+", default=None,
                   help="variables (expert_ids, router_scores, kv_latent, index_selected, attn_mass, hc_mix, ...), "
                        "probe sites or globs, or 'all'; default: routing + latent norms (+ FP8 errors when "
                        "simulated, + the indexer's selections on V3.2 / V4, + the attention-mass split on V4)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch and per commit")
    p.add_argument("--max-seq-len", type=int, default=512, help="longer records are cut into windows of this many")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help=f"zarr chunk length along token (default {DEFAULT_CHUNK_TOKENS} on disk, {REMOTE_CHUNK_TOKENS} "
                        "on object storage: 256 KiB objects for the per-token arrays, fewer requests)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted store instead of refusing it")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="be writer I of N processes filling one store (each runs with the same flags and input); "
                        "'auto': from RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS")
    p.add_argument("--cluster", default=None, metavar="local:N",
                   help="run on a dask.distributed LocalCluster of N worker processes on 127.0.0.1")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="run on an existing dask.distributed cluster (tcp://HOST:PORT); inputs must be readable "
                        "by every worker at the same path")
    p.add_argument("--task-tokens", type=int, default=1 << 20,
                   help="--cluster / --scheduler: tokens per task (many more tasks than workers; a retry repeats "
                        "at most one flush of one task)")
    p.add_argument("--retries", type=int, default=2, help="--cluster / --scheduler: retries of a task that raised")
    p.add_argument("--resources", default=None, metavar="NAME=N",
                   help="--scheduler: worker resources each task needs, e.g. GPU=1")
    p.add_argument("--wait", type=float, default=300.0, help="--shard: seconds to wait for another shard to create "
                                                             "the store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--storage-options: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options: expected a JSON object")
    return value


def _shard(text: str) -> tuple[int, int] | str:
    if text == "auto":
        return "auto"
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int]:
    """`--shard auto`: I/N from torchrun (RANK, WORLD_SIZE) or SLURM (SLURM_PROCID, SLURM_NTASKS)."""
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in env and size in env:
            text = f"{env[rank]}/{env[size]}"
            try:
                value = _shard(text)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--shard auto: {rank}/{size} = {text}: {e}") from None
            assert isinstance(value, tuple)
            return value
    raise ValueError("--shard auto: neither RANK/WORLD_SIZE (torchrun) nor SLURM_PROCID/SLURM_NTASKS is set")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Each --input as a file, or a glob's matches in sorted order; every one must be a .txt / .jsonl file."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) and not Path(pattern).exists() else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no file matches")
        for m in matches:
            check_input(Path(m))
            out.append(Path(m))
    return out


@dataclass(frozen=True)
class ShardPlan:
    """Contiguous runs of the single-writer batches, one per writer: first window and window count of each."""

    windows: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    region_tokens: int  # every writer's region: the largest shard's tokens, rounded up to whole chunks


def plan_shards(windows: Iterator[Window], batch_tokens: int, shards: int, chunk_tokens: int) -> ShardPlan:
    """Cut the batches of the whole input into `shards` runs of about equal tokens (a pure function of the input
    and flags, so every process computes the same plan)."""
    sizes = [(len(b), sum(len(ids) for _, ids in b)) for b in iter_batches(windows, batch_tokens)]  # (windows, tokens)
    total = sum(t for _, t in sizes)
    runs: list[tuple[int, int]] = []
    tokens: list[int] = []
    first = i = 0
    for s in range(shards):
        goal, done_tokens, count = total * (s + 1) / shards, sum(tokens), 0
        taken = 0
        while i < len(sizes) and (s == shards - 1 or done_tokens + taken + sizes[i][1] / 2 <= goal):
            count += sizes[i][0]
            taken += sizes[i][1]
            i += 1
        runs.append((first, count))
        tokens.append(taken)
        first += count
    region = max(chunk_tokens, -(-max(tokens) // chunk_tokens) * chunk_tokens)
    return ShardPlan(tuple(runs), tuple(tokens), region)


def _open_store(args: argparse.Namespace, storage: Storage, attrs: dict[str, Any],
                layout: Layout, vocab: Any, plan: ShardPlan | None) -> TraceStore:
    """The store, created or (--resume, --shard) opened, holding this writer's lock; registered with `run`, which
    releases it (and removes it if this run created it and fails before a commit) however the run ends."""
    writer, writers = args.shard
    if args.resume and storage.exists():
        store = _opened(TraceStore.open_for_append(storage, attrs, layout, writer=writer))
        if plan is not None and store.region_tokens != plan.region_tokens:
            raise TraceStoreError(f"{storage.name} was planned for another input or flags (region of "
                                  f"{store.region_tokens} tokens, this run plans {plan.region_tokens})")
        return store
    if plan is None:
        return _opened(TraceStore.create(storage, attrs, layout, chunk_tokens=args.chunk_tokens, vocab=vocab))
    if isinstance(storage, LocalStorage):
        try:
            storage.path.mkdir(parents=True)  # atomic: exactly one shard creates the store
        except FileExistsError:
            return _join(args, storage, attrs, layout, plan)
    try:
        return _opened(TraceStore.create(storage, attrs, layout, chunk_tokens=args.chunk_tokens, writers=writers,
                                         region_tokens=plan.region_tokens, writer=writer, vocab=vocab))
    except ClaimedError:
        return _join(args, storage, attrs, layout, plan)  # object storage: another shard's claim came first
    except BaseException:
        if isinstance(storage, LocalStorage):
            shutil.rmtree(storage.path, ignore_errors=True)  # undo the mkdir too (create removed the rest), so a
        raise  # rerun can create it; shards waiting to join see it gone and stop


def _opened(store: TraceStore) -> TraceStore:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(store)
    return store


def _join(args: argparse.Namespace, storage: Storage, attrs: dict[str, Any], layout: Layout,
          plan: ShardPlan) -> TraceStore:
    """Another shard creates the store: wait until all its attrs exist (written last, together), then take our
    region."""
    writer, writers = args.shard
    deadline = time.monotonic() + args.wait
    while not all(k in (found := _attrs_or_empty(storage)) for k in STORE_ATTRS):
        if not storage.exists():
            raise TraceStoreError(f"{storage.name}: the shard creating it failed and removed it (see its error); "
                                  "start the shards again")
        if time.monotonic() > deadline:
            raise TraceStoreError(f"{storage.name} exists but no shard finished creating it within {args.wait:g} s; "
                                  "if it is left from a killed start, delete it and start again")
        time.sleep(0.05)
    if (int(found["writers"]), int(found["region_tokens"])) != (writers, plan.region_tokens):
        raise TraceStoreError(f"{storage.name} was created for {found['writers']} writers with regions of "
                              f"{found['region_tokens']} tokens; this run (--shard {writer}/{writers}) plans "
                              f"{writers} of {plan.region_tokens}: another input or other flags")
    store = _opened(TraceStore.open_for_append(storage, attrs, layout, writer=writer))
    if store.tokens:
        raise TraceStoreError(f"{storage.name}: writer {writer} already holds {store.tokens} tokens; pass --resume to "
                              "continue it")
    return store


def _attrs_or_empty(storage: Storage) -> dict[str, Any]:
    try:
        return dict(json.loads(storage.get("zarr.json") or b"{}").get("attributes", {}))
    except (OSError, ValueError):
        return {}


def run(args: argparse.Namespace) -> int:
    """`workbench trace`, with the store seen to however the run ends: its writer lock is released, and a store
    this run created that holds no committed tokens is removed when the run fails (bad UTF-8 on line 1, Ctrl-C
    before the first commit), so the rerun after the fix needs no --resume and is not refused as existing."""
    storage = storage_for(args.out, args.storage_options)
    if isinstance(storage, LocalStorage) and storage.path.exists() and not storage.path.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a trace store folder; choose another path")
    if args.shard == "auto":
        args.shard = shard_from_env(os.environ)
    if args.chunk_tokens is None:
        args.chunk_tokens = DEFAULT_CHUNK_TOKENS if isinstance(storage, LocalStorage) else REMOTE_CHUNK_TOKENS
    if args.chunk_tokens < 1:
        raise ValueError(f"--chunk-tokens must be positive, got {args.chunk_tokens}")
    if args.cluster is not None or args.scheduler is not None:
        return _run_cluster(args, storage)
    opened: list[TraceStore] = []
    token = _OPENED.set(opened)
    ok = False
    try:
        rc = _run(args, storage)
        ok = rc == 0
        return rc
    finally:
        _OPENED.reset(token)
        for store in opened:
            if ok:
                store.release()  # closed already; a no-op unless a future path forgot to
            else:
                store.discard()


def _check_flags(args: argparse.Namespace, max_positions: int) -> None:
    if args.batch_tokens < 1 or args.max_seq_len < 1:
        raise ValueError("--batch-tokens and --max-seq-len must be positive")
    if args.max_seq_len > max_positions:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {max_positions} positions")


def _run_cluster(args: argparse.Namespace, storage: Storage) -> int:
    """The trace as dask.distributed tasks (cluster.py, imported only here)."""
    if args.cluster is not None and args.scheduler is not None:
        raise ValueError("give --cluster or --scheduler, not both")
    if args.shard != (0, 1):
        raise ValueError("--shard splits a run across processes you start; --cluster / --scheduler split it "
                         "themselves: give one or the other")
    if args.task_tokens < 1 or args.retries < 0:
        raise ValueError("--task-tokens must be positive and --retries >= 0")
    inputs = expand_inputs(args.input)
    resources = cluster.parse_resources(args.resources)
    loaded = load_model(args.model)
    _check_flags(args, loaded.model.config.max_position_embeddings)
    with cluster.connect(args.cluster, args.scheduler) as client:
        return cluster.run_driver(client, inputs=inputs, out=args.out, storage_options=args.storage_options,
                                  model=args.model, sites=args.sites, batch_tokens=args.batch_tokens,
                                  max_seq_len=args.max_seq_len, chunk_tokens=args.chunk_tokens,
                                  task_tokens=args.task_tokens, resume=args.resume, retries=args.retries,
                                  resources=resources, torch_threads=1 if args.cluster else None,
                                  progress=not args.no_progress, loaded=loaded)


def _run(args: argparse.Namespace, storage: Storage) -> int:
    inputs = expand_inputs(args.input)
    loaded = load_model(args.model)
    model, cfg = loaded.model, loaded.model.config
    _check_flags(args, cfg.max_position_embeddings)
    t = Trace(model, args.sites, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    attrs = t.attrs()
    writer, writers = args.shard

    def windows_of_input() -> Iterator[Window]:
        return iter_windows(inputs, loaded.tokenizer, args.max_seq_len, cfg.bos_token_id)

    plan = None
    first, count = 0, None
    if writers > 1:
        plan = plan_shards(windows_of_input(), args.batch_tokens, writers, args.chunk_tokens)
        first, count = plan.windows[writer]
    store = _open_store(args, storage, attrs, t.layout, t.vocab(), plan)
    windows = islice(windows_of_input(), first, None if count is None else first + count)
    if store.seqs:
        done = list(islice(windows, store.seqs - 1))
        last = next(windows, None)
        if len(done) != store.seqs - 1 or last is None or last[1] != store.last_window().tolist():
            raise ValueError(f"--resume: {' '.join(args.input)} does not start with the {store.seqs} windows already in "
                             f"{args.out}; the input or --max-seq-len changed")
        del done
    from tqdm import tqdm

    bar = tqdm(initial=store.tokens, unit="tok", unit_scale=True, desc="trace", disable=args.no_progress,
               file=sys.stderr)
    seq = first + store.seqs
    try:
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
        except BaseException:
            with contextlib.suppress(OSError):
                store.flush()  # commit every batch that finished before the error
            raise
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
    who = f" as writer {writer} of {writers}" if writers > 1 else ""
    print(f"traced {total} tokens in {store.seqs} windows to {args.out}{who} ({', '.join(t.layout.variables)})")
    return 0
