"""Median wall-clock timing shared by the benchmarks (imported as `timing`: the scripts run from this folder)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up call."""
    return interleaved_seconds([fn], repeats)[0]


def interleaved_seconds(fns: list[Callable[[], object]], repeats: int, seed: int = 0) -> list[float]:
    """Medians of fns run round-robin after one warm-up each, so load from other processes hits every variant alike.

    The order within each round is shuffled (seeded): with a fixed order one variant always runs right after the
    same other one, and on a shared 2-core machine that position alone moved medians by ~5%."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
