"""Latency of `Session.apply` for a change in the last layer vs the first layer, against a full re-run (the peer).

Usage: python benchmarks/bench_session.py [--repeats 11] [--prompt 128] [--continuation 0]
For the default model and a larger CPU config, prints the median ms of `apply` for a routing change in the last layer
(re-runs one layer) and for a latent change in layer 0 (re-runs every layer), each beside the peer: a full re-run of
the same change from the embedding with the same reports (`Session.full_run`). Ratio = full / apply (> 1: faster).
Each timed apply alternates between two settings, so every call really re-runs; the four are timed round-robin.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from workbench.config import PRESETS
from workbench.controls import AttentionControl, Controls, LatentControl, RoutingControl
from workbench.loader import load_model
from workbench.model.transformer import DeepSeekModel
from workbench.session import Session

# the bench_forward shape, deeper: V3-style routing where a CPU layer takes about a millisecond
LARGER = PRESETS["tiny"].replace(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
                                 num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64,
                                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def interleaved_medians(fns: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median ms of each fn, timed round-robin so that load from other processes hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(-1, repeats):  # i = -1 warms up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(name: str, model: DeepSeekModel, args: argparse.Namespace) -> None:
    ids = torch.randint(2, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    # one session per kind of change: alternating kinds in one session would make every apply re-run from layer 0
    session, other = (Session(model, ids, continuation=args.continuation) for _ in range(2))
    last = model.config.num_hidden_layers - 1

    def last_layer(i: int) -> Controls:
        return Controls(routing={last: RoutingControl(bias_offset={i % 2: 0.5})})

    def first_layer(i: int) -> Controls:  # MLA: a latent rank; V4 (no latent): the window length
        if model.config.is_v4:
            return Controls(attention={0: AttentionControl(sliding_window=8 + 8 * (i % 2))})
        return Controls(latent={0: LatentControl(8 + 8 * (i % 2))})

    t = interleaved_medians({
        "last": lambda i: session.apply(last_layer(i)),
        "first": lambda i: other.apply(first_layer(i)),
        "full_last": lambda i: session.full_run(last_layer(i)),
        "full_first": lambda i: session.full_run(first_layer(i)),
    }, args.repeats)
    print(f"{name:<32} {t['last']:>9.2f} {t['full_last']:>9.2f} {t['full_last'] / t['last']:>8.2f}x   "
          f"{t['first']:>9.2f} {t['full_first']:>9.2f} {t['full_first'] / t['first']:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--continuation", type=int, default=0, help="greedy tokens per apply (0: none)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"prompt {args.prompt} tokens, continuation {args.continuation}, median of {args.repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<32} {'-- change in the last layer --':^30}   {'-- change in layer 0 --':^30}")
    print(f"{'model':<32} {'apply ms':>9} {'full ms':>9} {'ratio':>9}   {'apply ms':>9} {'full ms':>9} {'ratio':>9}")
    for name in ("default", "default-v3"):
        model = load_model(name).model.eval()
        bench(f"{name} (bundled, {model.config.num_hidden_layers} layers)", model, args)
    bench("larger (8 layers, H=256, E=32)", DeepSeekModel.random(LARGER, seed=0), args)


if __name__ == "__main__":
    main()
