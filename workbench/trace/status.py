"""Where a trace run stands, from its store alone: `workbench trace-status STORE [--stalled-after S]`.

Design choices:
- The store is the only state a run has (dask's scheduler keeps none), so the status reads the `progress` rows
  and the plan in the attrs, nothing else: it works for a single process, `--shard` writers and cluster runs,
  running or dead, on disk or on object storage.
- "Stalled" is a region that has started, is not done and has not committed for `--stalled-after` seconds, by the
  modification time of its progress row (the file's mtime, the object's Last-Modified), so no clock is stored.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.trace.plan import PLAN_ATTR, TracePlan
from workbench.trace.reader import read_progress
from workbench.trace.storage import storage_for


@dataclass(frozen=True)
class StoreStatus:
    location: str
    committed_tokens: int
    planned_tokens: int | None  # None: a store without a plan (single process, --shard)
    regions: int
    done: int
    running: int  # started (tokens > 0), not done
    waiting: int  # nothing committed yet
    stalled: tuple[tuple[int, int, float], ...]  # (region, tokens, seconds since its last commit)
    complete: bool

    def lines(self) -> list[str]:
        share = f" of {self.planned_tokens:,} planned ({100 * self.committed_tokens / max(self.planned_tokens, 1):.1f}%)" \
            if self.planned_tokens is not None else ""
        out = [f"{self.location}: {self.committed_tokens:,} tokens committed{share}, "
               f"{'complete' if self.complete else 'not complete'}",
               f"regions: {self.done} done, {self.running} running, {self.waiting} waiting, of {self.regions}"]
        if self.stalled:
            shown = ", ".join(f"{r} ({tokens:,} tokens, {age:.0f} s)" for r, tokens, age in self.stalled[:20])
            more = f" and {len(self.stalled) - 20} more" if len(self.stalled) > 20 else ""
            out.append(f"stalled: {len(self.stalled)} regions: {shown}{more}; rerun with --resume to finish them")
        else:
            out.append("stalled: none")
        return out


def store_status(location: Any, storage_options: dict[str, Any] | None = None, stalled_after: float = 600.0,
                 now: float | None = None) -> StoreStatus:
    storage = storage_for(location, storage_options)
    attrs, rows, row_key = read_progress(storage)  # [regions, (tokens, seqs, done)], bounded like open_trace
    tokens, done = rows[:, 0], rows[:, 2].astype(bool)
    planned = TracePlan.from_json(str(attrs[PLAN_ATTR])).total_tokens if PLAN_ATTR in attrs else None
    started = (tokens > 0) & ~done
    clock = time.time() if now is None else now
    stalled = []
    for region in np.nonzero(started)[0]:
        modified = storage.modified(row_key(int(region)))  # when the region last committed
        if modified is not None and clock - modified > stalled_after:
            stalled.append((int(region), int(tokens[region]), clock - modified))
    return StoreStatus(storage.name, int(tokens.sum()), planned, len(rows), int(done.sum()), int(started.sum()),
                       int((~done & (tokens == 0)).sum()), tuple(stalled), bool(done.all()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a trace store folder or object-store URL")
    p.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                   help="object-store options beyond the environment, as for `workbench trace`")
    p.add_argument("--stalled-after", type=float, default=600.0, metavar="S",
                   help="a started, unfinished region with no commit for this many seconds is stalled")


def run(args: argparse.Namespace) -> int:
    for line in store_status(args.store, args.storage_options, args.stalled_after).lines():
        print(line)
    return 0
