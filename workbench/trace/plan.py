"""A cluster trace's plan: the single-writer run's batches cut into many tasks, each a region of the store.

Design choices:
- The plan is a pure function of the input and the flags, so it equals, batch for batch, what one process
  would run: `scan_file` (one task per input file, run in parallel on the cluster) tokenizes a file once and
  keeps only each record's position and window lengths; `build_plan` packs those windows into the same greedy
  batches as `corpus.iter_batches` and cuts the batch stream into tasks of about `task_tokens` tokens, on batch
  boundaries. Each task fills one region of the store, so the store reads back equal to a single-process run.
- The plan lives in the store's attrs (`trace_plan`): a resumed driver reads it back instead of re-planning,
  and a task needs nothing but the plan and its index. The inputs' sizes and modification times are kept so a
  resume on a changed input is refused instead of silently mixing two corpora.
Shape legend: T tasks, W windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.trace.corpus import Position, _pieces, _record_windows, iter_records

PLAN_VERSION = 1
PLAN_ATTR = "trace_plan"
RecordScan = tuple[int, int, tuple[int, ...]]  # (tell() cookie of its line, line number, window lengths)


@dataclass(frozen=True)
class Task:
    """One task's run of windows: it starts at window `skip` of the record at `start`."""

    start: Position
    skip: int
    windows: int
    tokens: int
    seq: int  # index of its first window over the whole input (the store's `seq`)


@dataclass(frozen=True)
class TracePlan:
    inputs: tuple[str, ...]  # absolute paths every worker reads
    stamps: tuple[tuple[int, int], ...]  # (size, mtime_ns) of each input when planned
    batch_tokens: int
    max_seq_len: int
    chunk_tokens: int
    task_tokens: int
    tasks: tuple[Task, ...]

    @property
    def region_tokens(self) -> int:
        """Every task's region: the largest task, rounded up to whole chunks (no two tasks share a chunk)."""
        largest = max((t.tokens for t in self.tasks), default=0)
        return max(self.chunk_tokens, -(-largest // self.chunk_tokens) * self.chunk_tokens)

    @property
    def total_tokens(self) -> int:
        return sum(t.tokens for t in self.tasks)

    def to_json(self) -> str:
        tasks = [[t.start.file, t.start.cookie, t.start.line, t.start.record, t.skip, t.windows, t.tokens, t.seq]
                 for t in self.tasks]
        return json.dumps({"version": PLAN_VERSION, "inputs": list(self.inputs), "stamps": [list(s) for s in self.stamps],
                           "batch_tokens": self.batch_tokens, "max_seq_len": self.max_seq_len,
                           "chunk_tokens": self.chunk_tokens, "task_tokens": self.task_tokens, "tasks": tasks},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TracePlan:
        d: dict[str, Any] = json.loads(text)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"trace plan version {d.get('version')!r}; this workbench reads {PLAN_VERSION}")
        tasks = tuple(Task(Position(f, c, line, r), skip, w, tok, seq) for f, c, line, r, skip, w, tok, seq in d["tasks"])
        return cls(tuple(d["inputs"]), tuple((int(a), int(b)) for a, b in d["stamps"]), int(d["batch_tokens"]),
                   int(d["max_seq_len"]), int(d["chunk_tokens"]), int(d["task_tokens"]), tasks)

    def check_inputs(self) -> None:
        """The inputs are the files this plan was made from (same size and modification time)."""
        for path, stamp in zip(self.inputs, self.stamps, strict=True):
            try:
                st = Path(path).stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: the input this trace was planned from is gone") from None
            if (st.st_size, st.st_mtime_ns) != stamp:
                raise ValueError(f"{path} changed since this trace was planned (size or modification time differs); "
                                 "trace it into a new store")


def input_stamps(inputs: Sequence[Path]) -> tuple[tuple[int, int], ...]:
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in inputs)


def scan_file(path: Path, tokenizer: object, max_len: int, bos: int | None) -> list[RecordScan]:
    """Every record of one file: where it starts and the lengths of its windows (the planning pass)."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    out: list[RecordScan] = []
    for _, (pos, chunks) in iter_records([path], positions=True):
        assert pos is not None
        lengths = tuple(len(ids) for ids in _record_windows(_pieces(chunks), encode, max_len, bos))
        out.append((pos.cookie, pos.line, lengths))
    return out


def _windows(scans: Sequence[Sequence[RecordScan]]) -> Iterator[tuple[Position, int, int]]:
    """(record position, window index in the record, window length) over all files, records numbered on."""
    record = 0
    for index, scan in enumerate(scans):
        for cookie, line, lengths in scan:
            pos = Position(index, cookie, line, record)
            for j, n in enumerate(lengths):
                yield pos, j, n
            record += 1


def build_plan(inputs: Sequence[Path], scans: Sequence[Sequence[RecordScan]], *, batch_tokens: int, max_seq_len: int,
               chunk_tokens: int, task_tokens: int) -> TracePlan:
    """Pack the windows into the single-writer run's batches and cut those into tasks of about `task_tokens`."""
    if task_tokens < 1:
        raise ValueError(f"task_tokens must be >= 1, got {task_tokens}")
    tasks: list[Task] = []
    task_first: tuple[Position, int] | None = None
    task_windows = task_tokens_now = batch_size = seq = 0

    def close_task() -> None:
        nonlocal task_first, task_windows, task_tokens_now
        if task_first is not None:
            tasks.append(Task(task_first[0], task_first[1], task_windows, task_tokens_now, seq - task_windows))
        task_first, task_windows, task_tokens_now = None, 0, 0

    for pos, j, n in _windows(scans):
        if batch_size and batch_size + n > batch_tokens:  # the window starts a new batch (iter_batches' rule)
            batch_size = 0
            if task_tokens_now >= task_tokens:
                close_task()
        if task_first is None:
            task_first = (pos, j)
        batch_size += n
        task_windows += 1
        task_tokens_now += n
        seq += 1
    close_task()
    return TracePlan(tuple(str(p.resolve()) for p in inputs), input_stamps(inputs), batch_tokens, max_seq_len,
                     chunk_tokens, task_tokens, tuple(tasks))
