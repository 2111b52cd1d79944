"""Median wall-clock timing shared by the benchmarks (imported as `timing`: the scripts run from this folder)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up call."""
    return interleaved_seconds([fn], repeats)[0]


def interleaved_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Medians of fns run round-robin after one warm-up each, so load from other processes hits every variant alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
