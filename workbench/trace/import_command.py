"""Import routing captured by vLLM or SGLang into a trace store: `workbench import-routing --from vllm|sglang`.

Design choices:
- Models larger than one machine run on the engines that already shard them; the workbench reads back the
  routing they return (`--enable-return-routed-experts`) instead of writing model parallelism. The result is an
  ordinary trace store (`expert_ids` only), so every analysis and view reads it like a native trace.
- The layout comes from the served model's config: `--model` loads a model as `workbench trace` does, `--config`
  reads a config.json alone and builds the module tree on the meta device (671B costs no memory), so the store's
  layout and `model_config` attrs equal those of a native trace of the same model.
- The input is read one JSONL line (one request) at a time; each becomes one window: doc = seq = the request's
  index, pos = 0..N-1. Next-token statistics are not returned by the engines and stay at their fill (NaN / -1).
- Uncaptured positions (-1) are counted by reason and stored in the attrs; above --max-uncaptured of all
  positions the import fails. A failed import removes the store it created: there is no --resume, and a rerun
  after the fix needs a clean path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.trace.routing_import import IMPORTERS, REASONS, RequestRouting, iter_jsonl_routing
from workbench.trace.schema import Layout
from workbench.trace.storage import storage_for
from workbench.trace.store import DEFAULT_CHUNK_TOKENS, TraceStore

DEFAULT_MAX_UNCAPTURED = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=sorted(IMPORTERS),
                   help="the engine that wrote the input (fields per engine: docs/routing-import.md)")
    p.add_argument("--input", required=True, type=Path, help=".jsonl: one captured request (JSON object) per line")
    p.add_argument("--out", required=True, help="the zarr trace store to create: a folder or an object-store URL "
                                                "(s3://bucket/run.zarr, ...)")
    p.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                   help="object-store options beyond the environment, as for `workbench trace`")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="the served model: 'default', 'default-v3', a preset such as 'tiny-random', "
                                       "or a checkpoint directory")
    model.add_argument("--config", type=Path, help="the served model's HF config.json (no weights needed)")
    p.add_argument("--choice", type=int, default=0, help="which completion of a request with several (n > 1)")
    p.add_argument("--max-uncaptured", type=float, default=DEFAULT_MAX_UNCAPTURED, metavar="FRACTION",
                   help="fail when more than this fraction of all positions has no routing (default 0.5)")
    p.add_argument("--source-version", default=None, help="the engine's version, kept in the store attrs")
    p.add_argument("--revision", default=None,
                   help="the served checkpoint's name or revision, stored as the `checkpoint` attr "
                        "(default: the --model digest, or config:sha256:... of --config)")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="zarr chunk length along token")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Target:
    """What the store is written for: the layout, the identifying attrs, the vocabulary text (or None)."""

    layout: Layout
    attrs: dict[str, Any]
    vocab: Sequence[str] | None
    vocab_size: int


def import_target(model_name: str | None, config: Path | None, revision: str | None) -> Target:
    """The layout and attrs a native `expert_ids` trace of the served model would have."""
    from workbench.trace.recorder import Trace

    if config is not None:
        model, tokenizer, checkpoint = _config_only(config)
    else:
        from workbench.loader import load_model

        loaded = load_model(model_name or "default")
        model, tokenizer, checkpoint = loaded.model, loaded.tokenizer, loaded.digest
    t = Trace(model, ["expert_ids"], tokenizer=tokenizer, keep=False, checkpoint=revision or checkpoint)
    vocab = list(t.vocab()) if tokenizer is not None else None
    return Target(t.layout, t.attrs(), vocab, int(model.config.vocab_size))


def _config_only(config: Path) -> tuple[Any, Any, str]:
    """A meta-device model of a config.json, the tokenizer.json beside it (if any), and a digest of the config."""
    from workbench.checkpoint import build_meta
    from workbench.config import ModelConfig
    from workbench.tokenizer import HFTokenizer

    path = config / "config.json" if config.is_dir() else config
    if not path.is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    cfg = ModelConfig.from_json(path)
    tok_file = path.parent / "tokenizer.json"
    tokenizer = HFTokenizer(tok_file) if tok_file.is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        tokenizer = None  # not this model's: token text stays "" rather than wrong
    return build_meta(cfg), tokenizer, f"config:sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def request_batch(req: RequestRouting, index: int) -> dict[str, np.ndarray]:
    """One request as a store batch: routing, coords, and the next-token statistics at their fill."""
    N = len(req.token_ids)
    return {"token_id": req.token_ids.astype(np.int32), "doc": np.full(N, index, dtype=np.int32),
            "seq": np.full(N, index, dtype=np.int32), "pos": np.arange(N, dtype=np.int32),
            "expert_ids": req.expert_ids, "logprob": np.full(N, np.nan, dtype=np.float32),
            "loss": np.full(N, np.nan, dtype=np.float32), "pred_id": np.full(N, -1, dtype=np.int32)}


@dataclass
class Tally:
    """Requests, tokens and uncaptured positions imported so far."""

    requests: int = 0
    tokens: int = 0
    uncaptured: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def add(self, req: RequestRouting) -> None:
        self.requests += 1
        self.tokens += len(req.token_ids)
        self.uncaptured += req.n_uncaptured
        for reason, n in req.uncaptured.items():
            self.by_reason[reason] += n

    @property
    def fraction(self) -> float:
        return self.uncaptured / self.tokens if self.tokens else 0.0

    def reasons(self) -> str:
        return ", ".join(f"{r} {n}" for r, n in self.by_reason.items() if n) or "none"


def run(args: argparse.Namespace) -> int:
    """`workbench import-routing`: a store this run created is removed again if the import fails."""
    _check_args(args)
    storage = storage_for(args.out, args.storage_options)
    made = not storage.exists()
    target = import_target(args.model, args.config, args.revision)
    attrs = {**target.attrs, "source": args.source}
    if args.source_version is not None:
        attrs["source_version"] = str(args.source_version)
    store = TraceStore.create(storage, attrs, target.layout, chunk_tokens=args.chunk_tokens, vocab=target.vocab)
    ok = False
    try:
        tally = _import(args, store, target)
        ok = True
    finally:
        if not ok:
            store.release()
            storage.remove_created(made)
    print(f"imported {tally.tokens} tokens of {tally.requests} requests from {args.input} ({args.source}) to "
          f"{args.out}; {tally.uncaptured} positions ({tally.fraction:.1%}) not captured ({tally.reasons()})")
    return 0


def _import(args: argparse.Namespace, store: TraceStore, target: Target) -> Tally:
    from tqdm import tqdm

    tally = Tally()
    bar = tqdm(unit="tok", unit_scale=True, desc="import-routing", disable=args.no_progress, file=sys.stderr)
    try:
        for req in iter_jsonl_routing(args.input, args.source, target.layout, choice=args.choice,
                                      vocab_size=target.vocab_size):
            store.append(request_batch(req, tally.requests), windows=1)
            tally.add(req)
            bar.update(len(req.token_ids))
    finally:
        bar.close()
    if tally.requests == 0:
        raise ValueError(f"--input {args.input}: no requests (every line is blank)")
    if tally.fraction > args.max_uncaptured:
        raise ValueError(f"{args.input}: {tally.uncaptured} of {tally.tokens} positions ({tally.fraction:.1%}) have "
                         f"no routing ({tally.reasons()}), more than --max-uncaptured {args.max_uncaptured:g}; "
                         f"{args.out} was removed. Raise --max-uncaptured to import it anyway")
    store.flush()
    store.group.update_attributes({"uncaptured": tally.uncaptured, "uncaptured_by_reason": json.dumps(tally.by_reason),
                                   "imported_requests": tally.requests})  # one zarr.json write, not one per key
    store.close()
    return tally


def _check_args(args: argparse.Namespace) -> None:
    if not args.input.is_file():
        raise FileNotFoundError(f"--input {args.input}: no such file")
    if not 0.0 <= args.max_uncaptured <= 1.0:
        raise ValueError(f"--max-uncaptured {args.max_uncaptured:g}: expected a fraction in 0..1")
    if args.choice < 0:
        raise ValueError(f"--choice {args.choice}: expected a completion index >= 0")
    if args.chunk_tokens < 1:
        raise ValueError(f"--chunk-tokens {args.chunk_tokens}: expected a positive chunk length")
    if "://" not in args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a trace store folder; choose another path")


