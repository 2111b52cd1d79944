"""Tracing a corpus on a dask.distributed cluster: `workbench trace ... --cluster local:N | --scheduler ADDR`.

Design choices:
- dask.distributed is the engine (retries, a restarted worker's task re-run elsewhere, progress events); this
  module only says what a task is. It is imported only when one of the two flags is given.
- The driver plans once (`plan.py`: one scan task per input file, in parallel on the cluster), creates the store
  with one region per task (many more tasks than workers) and the plan in its attrs, then maps `trace_task` over
  the tasks not yet done. It alone writes the root metadata at the end (attrs["complete"], consolidated metadata).
- A task is a pure function of (plan, index): it opens its region, resumes after the region's committed windows
  (its own earlier attempt's), runs its batches with one model replica per worker process, and commits as the
  single-process path does. So a task re-run after a worker died repeats at most one flush, a repeated task of a
  finished region does nothing, and on object storage a duplicate attempt running at the same time loses its
  next commit (the progress row's compare-and-swap) and stops as "superseded" instead of overwriting.
- The driver is restartable: the store is the checkpoint (dask's scheduler keeps no state), so `--resume`
  reads the plan back and submits only the regions not marked done.
- Fault injection for the tests: WORKBENCH_TRACE_FAULT="TASK:COMMITS:MARKER" makes task TASK's worker process
  exit hard (os._exit, no flush) right after its COMMITS-th commit, once (MARKER is created exclusively).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.loader import LoadedModel, load_model
from workbench.trace.corpus import iter_batches, iter_windows
from workbench.trace.plan import PLAN_ATTR, TracePlan, build_plan, scan_file
from workbench.trace.reader import read_progress
from workbench.trace.recorder import Trace
from workbench.trace.schema import PROGRESS
from workbench.trace.storage import SupersededError, storage_for
from workbench.trace.store import AlreadyFinishedError, TraceStore
from workbench.trace.zarr_io import TraceStoreError, array_of, open_store

TOPIC = "workbench-trace"  # worker -> driver events: {"task": i, "tokens": n} per batch, and once per attempt
# {"task": i, "tokens": 0, "start": committed} (where the attempt resumed: 0 unless an earlier one committed)
FAULT_ENV = "WORKBENCH_TRACE_FAULT"
TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"  # unset for our LocalClusters


@dataclass(frozen=True)
class ClusterJob:
    """Everything a task needs, sent to every worker once (`Client.scatter`)."""

    plan: TracePlan
    out: str
    storage_options: dict[str, Any] | None
    model: str
    sites: tuple[str, ...] | None
    torch_threads: int | None  # set in each task (a LocalCluster worker per core: 1)


@dataclass(frozen=True)
class TaskOutcome:
    task: int
    status: str  # "done", "done before" (finished by an earlier attempt), "superseded" (another attempt owns it)
    tokens: int


@functools.lru_cache(maxsize=2)
def _replica(model: str) -> LoadedModel:
    """One model replica per worker process, loaded by its first task and kept for the process's life."""
    return load_model(model)


def scan_task(path: str, model: str, max_len: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """The planning pass over one input file, on a worker (the tokenizer comes with the model replica)."""
    loaded = _replica(model)
    return scan_file(Path(path), loaded.tokenizer, max_len, loaded.model.config.bos_token_id)


def trace_task(job: ClusterJob, index: int) -> TaskOutcome:
    """Fill region `index` of the store with its task's batches, resuming after what the region committed."""
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    loaded = _replica(job.model)
    cfg = loaded.model.config
    t = Trace(loaded.model, list(job.sites) if job.sites else None, tokenizer=loaded.tokenizer, keep=False,
              checkpoint=loaded.digest)
    task = job.plan.tasks[index]
    try:
        store = TraceStore.open_for_append(job.out, t.attrs(), t.layout, writer=index,
                                           storage_options=job.storage_options)
    except AlreadyFinishedError:
        return TaskOutcome(index, "done before", task.tokens)
    fault = _fault(index)
    _report(index, 0, start=store.tokens)
    try:
        windows = itertools.islice(iter_windows([Path(p) for p in job.plan.inputs], loaded.tokenizer,
                                                job.plan.max_seq_len, cfg.bos_token_id, start=task.start),
                                   task.skip, task.skip + task.windows)
        _skip_committed(windows, store, index)
        seq, commits = task.seq + store.seqs, 0
        with t, torch.inference_mode():
            for batch in iter_batches(windows, job.plan.batch_tokens):
                lengths = [len(ids) for _, ids in batch]
                padded = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # [B, S] right-padded
                for i, (_, ids) in enumerate(batch):
                    padded[i, : len(ids)] = torch.tensor(ids)
                before = store.tokens
                store.append(t.forward(padded, lengths, seq=range(seq, seq + len(batch)), doc=[d for d, _ in batch]),
                             windows=len(batch))
                seq += len(batch)
                _report(index, sum(lengths))
                if store.tokens != before:
                    commits += 1
                    if fault is not None and commits == fault[0] and _claim_marker(fault[1]):
                        os._exit(1)  # the test's hard kill: no flush, no clean-up
        store.close(complete=True, finalize=False)
    except SupersededError:
        store.release()
        return TaskOutcome(index, "superseded", store.tokens)
    except BaseException:
        with contextlib.suppress(Exception):
            store.flush()  # commit every batch that finished before the error: the retry resumes after it
        store.release()
        raise
    if store.tokens != task.tokens:
        raise TraceStoreError(f"task {index} wrote {store.tokens} tokens, its plan says {task.tokens}: the input "
                              "changed while it was traced")
    return TaskOutcome(index, "done", store.tokens)


def _skip_committed(windows: Any, store: TraceStore, index: int) -> None:
    """Advance past the windows the region already committed, checking the last of them is still the input's."""
    if not store.seqs:
        return
    done = list(itertools.islice(windows, store.seqs - 1))
    last = next(windows, None)
    if len(done) != store.seqs - 1 or last is None or last[1] != store.last_window().tolist():
        raise TraceStoreError(f"task {index}: the input does not start with the {store.seqs} windows its region "
                              "already holds; the input changed")


def _report(index: int, tokens: int, **extra: int) -> None:
    """A progress event to the driver (no-op outside a dask worker)."""
    try:
        from distributed import get_worker

        get_worker().log_event(TOPIC, {"task": index, "tokens": tokens, **extra})
    except (ImportError, ValueError):
        pass


def _fault(index: int) -> tuple[int, str] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    task, commits, marker = spec.split(":", 2)
    return (int(commits), marker) if int(task) == index else None


def _claim_marker(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- the driver
def parse_cluster(text: str) -> int:
    """`local:N` -> N workers."""
    kind, _, n = text.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise ValueError(f"--cluster {text!r}: expected local:N with N >= 1 workers (or use --scheduler tcp://HOST:PORT)")
    return int(n)


def parse_resources(text: str | None) -> dict[str, float] | None:
    """`GPU=1,MEM=2` -> {"GPU": 1.0, "MEM": 2.0}: what each trace task needs of a worker's resources."""
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, amount = part.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"--resources {text!r}: expected NAME=AMOUNT[,NAME=AMOUNT...], e.g. GPU=1") from None
    return out


@contextlib.contextmanager
def connect(cluster: str | None, scheduler: str | None) -> Iterator[Any]:
    """A Client on a new LocalCluster on 127.0.0.1 (`local:N`) or on an existing scheduler."""
    import dask
    from distributed import Client, LocalCluster

    environ = dict(os.environ)  # the Nanny sets OMP_NUM_THREADS=1 ... in this process's environment to spawn
    try:  # workers, and leaves it: put it back, or every later subprocess of the driver runs on one thread
        if cluster is None:
            with Client(scheduler) as client:
                yield client
            return
        dashboard = "127.0.0.1:0" if _has_bokeh() else None
        # the Nanny's default MALLOC_TRIM_THRESHOLD_=65536 also fixes glibc's mmap threshold, so every tensor
        # over 128 KiB is mapped and unmapped afresh: torch's CPU forward ran 2.1x slower in a worker with it
        with dask.config.set({TRIM_SETTING: None}), LocalCluster(
                n_workers=parse_cluster(cluster), threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=dashboard) as local, Client(local) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def run_driver(client: Any, *, inputs: list[Path], out: str, storage_options: dict[str, Any] | None, model: str,
               sites: list[str] | None, batch_tokens: int, max_seq_len: int, chunk_tokens: int, task_tokens: int,
               resume: bool, retries: int, resources: dict[str, float] | None, torch_threads: int | None,
               progress: bool = True, loaded: LoadedModel | None = None) -> int:
    """Plan (or read the plan back), create the store, run every task not yet done, finalize; the exit code.
    `loaded`: the driver's copy of `model` when the caller has it already (the workers load their own)."""
    from distributed import as_completed
    from tqdm import tqdm

    loaded = loaded or load_model(model)
    t = Trace(loaded.model, sites, tokenizer=loaded.tokenizer, keep=False, checkpoint=loaded.digest)
    storage = storage_for(out, storage_options)
    if resume and storage.exists():
        attrs, rows, _ = read_progress(storage)  # [tasks, (tokens, seqs, done)]
        plan = _stored_plan(storage, attrs)
        plan.check_inputs()
    else:
        scans = client.gather(client.map(scan_task, [str(p.resolve()) for p in inputs], model=model,
                                         max_len=max_seq_len, pure=False))
        plan = build_plan(inputs, scans, batch_tokens=batch_tokens, max_seq_len=max_seq_len, chunk_tokens=chunk_tokens,
                          task_tokens=task_tokens)
        if not plan.tasks:
            raise ValueError(f"--input {', '.join(map(str, inputs))}: no records to trace")
        store = TraceStore.create(storage, {**t.attrs(), PLAN_ATTR: plan.to_json()}, t.layout, chunk_tokens=chunk_tokens,
                                  writers=len(plan.tasks), region_tokens=plan.region_tokens, vocab=t.vocab())
        store.release()  # the driver writes no region: tasks open their own
        rows = np.zeros((len(plan.tasks), 3), dtype=np.int64)  # a new store: nothing committed
    pending = [i for i in range(len(plan.tasks)) if not rows[i, 2]]
    job = ClusterJob(plan, out, storage_options, model, tuple(sites) if sites else None, torch_threads)
    bar = tqdm(total=plan.total_tokens, initial=int(rows[:, 0].sum()), unit="tok", unit_scale=True, desc="trace",
               disable=not progress, file=sys.stderr)
    if client.dashboard_link and _has_bokeh():
        print(f"workbench trace: dask dashboard at {client.dashboard_link}", file=sys.stderr)
    client.subscribe_topic(TOPIC, lambda event: bar.update(int(event[1]["tokens"])))
    run = uuid.uuid4().hex[:8]
    shared = client.scatter(job, broadcast=True)
    futures = client.map(trace_task, [shared] * len(pending), pending, pure=False, retries=retries,
                         key=[f"trace-{run}-{i}" for i in pending], resources=resources)
    failed: dict[int, str] = {}
    try:
        for future in as_completed(futures):
            index = pending[futures.index(future)]
            try:
                future.result()
            except Exception as e:  # KilledWorker after allowed-failures, or the task's own error
                failed[index] = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:
        bar.close()
        client.cancel(futures)
        print(f"workbench trace: interrupted; rerun with --resume to finish {out}", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(TOPIC)
    bar.close()
    rows = read_progress(storage)[1]
    unfinished = [i for i in range(len(plan.tasks)) if not rows[i, 2]]
    if unfinished:
        for i in unfinished[:10]:
            print(f"workbench trace: task {i} did not finish: {failed.get(i, 'no result')}", file=sys.stderr)
        print(f"workbench trace: {len(unfinished)} of {len(plan.tasks)} tasks unfinished, {int(rows[:, 0].sum())} "
              f"tokens committed; rerun with --resume to finish them", file=sys.stderr)
        return 1
    finalize(storage)
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    print(f"traced {int(rows[:, 0].sum())} tokens in {int(rows[:, 1].sum())} windows to {out} "
          f"({len(plan.tasks)} tasks on {workers} workers; {', '.join(t.layout.variables)})")
    return 0


def _stored_plan(storage: Any, attrs: dict[str, Any]) -> TracePlan:
    if PLAN_ATTR not in attrs:
        raise TraceStoreError(f"{storage.name} was not made by a cluster run (no {PLAN_ATTR} in its attrs); resume it "
                              "the way it was started")
    return TracePlan.from_json(str(attrs[PLAN_ATTR]))


def finalize(storage: Any) -> None:
    """Mark a store whose regions are all done complete and consolidate its metadata (the driver's job alone: one
    writer of the root metadata), after which a remote `xarray.open_zarr` needs one metadata GET."""
    import zarr

    group, _ = open_store(storage, mode="r+")
    if not np.asarray(array_of(group, PROGRESS)[:])[:, 2].all():
        raise TraceStoreError(f"{storage.name}: not every region is done; refusing to mark it complete")
    group.attrs["complete"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the v3 spec": other readers ignore it, ours never read it
        zarr.consolidate_metadata(storage.zarr_store, zarr_format=3)
