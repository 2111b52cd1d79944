"""Trace a corpus into a zarr trace store: `workbench trace --input FILE --out STORE.zarr [--resume]`.

Design choices:
- The input is streamed record by record (.txt: one record per non-empty line; .jsonl: one object with a
  "text" field per line), cut into windows of at most --max-seq-len tokens, and packed greedily into batches of
  about --batch-tokens tokens; only one batch is ever in memory, so memory stays flat on any input size. A record
  is itself read and tokenized PIECE_CHARS characters at a time (see `iter_windows`): tokenizing a 50 MB line
  whole took 9 GB, as a tokenizer's encoding costs ~190 bytes per character.
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
  gets there first creates the store (an atomic mkdir decides); the others wait for it and join.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from workbench.loader import load_model
from workbench.trace.recorder import Trace
from workbench.trace.schema import Layout
from workbench.trace.store import DEFAULT_CHUNK_TOKENS, TraceStore
from workbench.trace.zarr_io import TraceStoreError

Window = tuple[int, list[int]]  # (input record index, token ids)
PIECE_CHARS = 1 << 16  # a record is read and tokenized this many characters at a time: ~12 MB of tokenizer memory
# (a tokenizer's encoding costs ~190 bytes per character), while a tokenizer call costs ~0.1 ms, so the cuts are free
_OPENED: ContextVar[list[TraceStore] | None] = ContextVar("trace_stores_opened", default=None)  # by this run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a preset name, or a checkpoint directory")
    p.add_argument("--input", required=True, type=Path, help=".txt (a record per line) or .jsonl ('text' field)")
    p.add_argument("--out", required=True, type=Path, help="the zarr trace store to create (or continue)")
    p.add_argument("--sites", nargs="+", default=None,
                   help="variables (expert_ids, router_scores, kv_latent, index_selected, attn_mass, hc_mix, ...), "
                        "probe sites or globs, or 'all'; default: routing + latent norms (+ FP8 errors when "
                        "simulated, + the indexer's selections on V3.2 / V4, + the attention-mass split on V4)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch and per commit")
    p.add_argument("--max-seq-len", type=int, default=512, help="longer records are cut into windows of this many")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="zarr chunk length along token")
    p.add_argument("--resume", action="store_true", help="continue an interrupted store instead of refusing it")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="be writer I of N processes filling one store (each runs with the same flags and input)")
    p.add_argument("--wait", type=float, default=300.0, help="--shard: seconds to wait for another shard to create "
                                                             "the store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def iter_windows(path: Path, tokenizer: object, max_len: int, bos: int | None) -> Iterator[Window]:
    """Stream (record index, window token ids) from a .txt or .jsonl file, in memory that does not grow with the
    file or with a record.

    A record is read and tokenized PIECE_CHARS characters at a time, and each window is yielded as soon as it is
    full. Pieces are cut before a space that separates two non-space characters: a byte-level BPE pre-tokenizer
    (GPT-2, Llama 3, DeepSeek; a word takes at most one leading space, no token ends in one) never merges across
    such a space, so the tokens equal those of the record tokenized whole. Only a run of more than PIECE_CHARS/2
    characters without such a space (CJK text, base64) is cut where the piece is full, and only the tokens at that
    cut may differ. Held whole anyway: a .jsonl line (it has to be parsed; its text is then cut the same way), and
    the leading whitespace of a .txt line (until its first non-space character shows it is not blank).
    A leading UTF-8 BOM is not part of the first record; bad UTF-8 is a ValueError naming file, line and byte.
    """
    encode: Callable[[str], list[int]] = tokenizer.encode  # type: ignore[attr-defined]
    try:
        with path.open(encoding="utf-8-sig") as f:
            records = _jsonl_records(f, path) if path.suffix == ".jsonl" else _txt_records(f)
            for record, chunks in enumerate(records):
                for ids in _record_windows(_pieces(chunks), encode, max_len, bos):
                    yield record, ids
    except UnicodeDecodeError:
        raise ValueError(_utf8_error(path)) from None


def _txt_records(f: TextIO) -> Iterator[Iterator[str]]:
    """Each non-blank line, as an iterator over its text read PIECE_CHARS characters at a time (exhaust it before
    asking for the next line: both read the same file)."""
    while head := f.readline(PIECE_CHARS):
        while not head.strip() and not head.endswith("\n"):  # blank so far: read on to its first non-space
            more = f.readline(PIECE_CHARS)
            if not more:
                break
            head += more
        if head.strip():
            yield _rest_of_line(f, head)


def _rest_of_line(f: TextIO, piece: str) -> Iterator[str]:
    while not piece.endswith("\n"):
        yield piece
        piece = f.readline(PIECE_CHARS)
        if not piece:
            return
    yield piece[:-1]


def _jsonl_records(f: TextIO, path: Path) -> Iterator[Iterator[str]]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
        del line, obj  # only the text stays while it is tokenized
        yield iter((text,))


def _pieces(chunks: Iterable[str]) -> Iterator[str]:
    """A record's text, read in chunks of any length, re-cut into pieces of at most PIECE_CHARS characters (see
    `_cut`); always at least one piece, "" for an empty record."""
    size, rest = PIECE_CHARS, ""
    for chunk in chunks:
        text, start = rest + chunk, 0
        while len(text) - start > size:
            cut = _cut(text, start, start + size)
            yield text[start:cut]
            start = cut
        rest = text[start:]
    yield rest


def _cut(text: str, lo: int, hi: int) -> int:
    """Where the piece starting at `lo` ends: before the last space between two non-space characters in the second
    half of text[lo:hi] (no pre-token of a byte-level BPE spans one), else at `hi`. Needs len(text) > hi."""
    half = lo + (hi - lo) // 2
    i = text.rfind(" ", half, hi)
    while i > half:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", half, i)
    return hi


def _record_windows(pieces: Iterable[str], encode: Callable[[str], list[int]], max_len: int, bos: int | None
                    ) -> Iterator[list[int]]:
    """The record's tokens (BOS first) in windows of `max_len`, each yielded as soon as it is full: the same
    windows as cutting the whole record's tokens, holding at most one piece's tokens."""
    ids: list[int] = [bos] if bos is not None else []
    for piece in pieces:
        ids += encode(piece)
        full = len(ids) - len(ids) % max_len
        for start in range(0, full, max_len):
            yield ids[start:start + max_len]
        del ids[:full]
    if ids:
        yield ids


def _utf8_error(path: Path) -> str:
    """`FILE:LINE: not valid UTF-8 (byte offset N)` for the first invalid byte of the file (N from the start of
    the file). The text reader decodes ahead of the line it returns, so its own error tells neither; lines are
    counted as it splits them (\\n, \\r\\n or \\r)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, after_cr = 1, 0, False
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # bytes of a character the previous block cut
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                line += _line_breaks(e.object[:e.start].decode("utf-8"), after_cr)
                return f"{path}:{line}: not valid UTF-8 (byte offset {offset - held + e.start})"
            if not block:
                return f"{path}: not valid UTF-8"  # not found again: the file changed while it was read
            line += _line_breaks(text, after_cr)
            after_cr = text.endswith("\r") if text else after_cr
            offset += len(block)


def _line_breaks(text: str, after_cr: bool) -> int:
    """Line breaks in `text` as universal newlines count them; `after_cr`: the text before ended in \\r (so a
    leading \\n completes that break)."""
    n = text.count("\n") + text.count("\r") - text.count("\r\n")
    return n - int(after_cr and text.startswith("\n"))


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


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


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


def _open_store(args: argparse.Namespace, attrs: dict[str, Any], layout: Layout, vocab: Any,
                plan: ShardPlan | None) -> TraceStore:
    """The store, created or (--resume, --shard) opened, holding this writer's lock; registered with `run`, which
    releases it (and removes it if this run created it and fails before a commit) however the run ends."""
    writer, writers = args.shard
    if args.resume and args.out.exists():
        store = _opened(TraceStore.open_for_append(args.out, attrs, layout, writer=writer))
        if plan is not None and store.region_tokens != plan.region_tokens:
            raise TraceStoreError(f"{args.out} was planned for another input or flags (region of "
                                  f"{store.region_tokens} tokens, this run plans {plan.region_tokens})")
        return store
    if plan is None:
        return _opened(TraceStore.create(args.out, attrs, layout, chunk_tokens=args.chunk_tokens, vocab=vocab))
    try:
        args.out.mkdir(parents=True)  # atomic: exactly one shard creates the store
    except FileExistsError:
        return _join(args, attrs, layout, plan)
    try:
        return _opened(TraceStore.create(args.out, attrs, layout, chunk_tokens=args.chunk_tokens, writers=writers,
                                         region_tokens=plan.region_tokens, writer=writer, vocab=vocab))
    except BaseException:
        shutil.rmtree(args.out, ignore_errors=True)  # undo the mkdir too (create removed the rest), so a rerun
        raise  # can create it; shards waiting to join see it gone and stop


def _opened(store: TraceStore) -> TraceStore:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(store)
    return store


def _join(args: argparse.Namespace, attrs: dict[str, Any], layout: Layout, plan: ShardPlan) -> TraceStore:
    """Another shard creates the store: wait until its attrs exist (written last), then take our region."""
    writer, writers = args.shard
    deadline = time.monotonic() + args.wait
    while not (args.out / "zarr.json").exists() or "writers" not in _attrs_or_empty(args.out):
        if not args.out.exists():
            raise TraceStoreError(f"{args.out}: the shard creating it failed and removed it (see its error); "
                                  "start the shards again")
        if time.monotonic() > deadline:
            raise TraceStoreError(f"{args.out} exists but no shard finished creating it within {args.wait:g} s; "
                                  "if it is left from a killed start, delete it and start again")
        time.sleep(0.05)
    found = _attrs_or_empty(args.out)
    if (int(found["writers"]), int(found["region_tokens"])) != (writers, plan.region_tokens):
        raise TraceStoreError(f"{args.out} was created for {found['writers']} writers with regions of "
                              f"{found['region_tokens']} tokens; this run (--shard {writer}/{writers}) plans "
                              f"{writers} of {plan.region_tokens}: another input or other flags")
    store = _opened(TraceStore.open_for_append(args.out, attrs, layout, writer=writer))
    if store.tokens:
        raise TraceStoreError(f"{args.out}: writer {writer} already holds {store.tokens} tokens; pass --resume to "
                              "continue it")
    return store


def _attrs_or_empty(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / "zarr.json").read_text()).get("attributes", {}))
    except (OSError, ValueError):
        return {}


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


def _check_out(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a trace store folder; choose another path")


def run(args: argparse.Namespace) -> int:
    """`workbench trace`, with the store seen to however the run ends: its writer lock is released, and a store
    this run created that holds no committed tokens is removed when the run fails (bad UTF-8 on line 1, Ctrl-C
    before the first commit), so the rerun after the fix needs no --resume and is not refused as existing."""
    _check_out(args.out)
    opened: list[TraceStore] = []
    token = _OPENED.set(opened)
    ok = False
    try:
        rc = _run(args)
        ok = rc == 0
        return rc
    finally:
        _OPENED.reset(token)
        for store in opened:
            if ok:
                store.release()  # closed already; a no-op unless a future path forgot to
            else:
                store.discard()


def _run(args: argparse.Namespace) -> int:
    _check_input(args.input)
    if args.batch_tokens < 1 or args.max_seq_len < 1:
        raise ValueError("--batch-tokens and --max-seq-len must be positive")
    loaded = load_model(args.model)
    model, cfg = loaded.model, loaded.model.config
    if args.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    t = Trace(model, args.sites, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    attrs = t.attrs()
    writer, writers = args.shard

    def windows_of_input() -> Iterator[Window]:
        return iter_windows(args.input, loaded.tokenizer, args.max_seq_len, cfg.bos_token_id)

    plan = None
    first, count = 0, None
    if writers > 1:
        plan = plan_shards(windows_of_input(), args.batch_tokens, writers, args.chunk_tokens)
        first, count = plan.windows[writer]
    store = _open_store(args, attrs, t.layout, t.vocab(), plan)
    windows = islice(windows_of_input(), first, None if count is None else first + count)
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
