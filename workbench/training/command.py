"""Train the bundled default model from the standard library: tokenizer, model, run log and its plot."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from workbench.training.train import RUN_LOG, TrainConfig, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    p.add_argument("--out", required=True, type=Path, help="directory for config.json, model.safetensors, "
                   "tokenizer.json, run-log.json and run-log.png (created; files in it are replaced)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--arch", choices=("v4", "v3"), default=defaults.arch,
                   help="model shape: v4 (the bundled `default`) or v3 (`default-v3`)")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    cfg = dataclasses.replace(TrainConfig(), steps=args.steps, seed=args.seed, threads=args.threads,
                              arch=args.arch)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    result = train(cfg, out, progress=not args.quiet)
    from workbench.training.plot import plot_run_log

    plot_run_log(out / RUN_LOG, out / "run-log.png")
    log = result.log
    print(f"trained {cfg.steps} steps in {log['train_seconds'] / 60:.1f} min; held-out loss "
          f"{log['final_held_out_loss']:.3f} nats over {log['final_held_out_tokens']} tokens; wrote {out}")
    return 0
