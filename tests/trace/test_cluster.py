"""Tracing on a dask.distributed LocalCluster (2 worker processes on 127.0.0.1): equal to the single-process run
with a worker killed mid-task, on disk and on S3 (moto), a killed driver resumed without redoing finished
tasks, the plan, `--shard auto` and `workbench trace-status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from trace_helpers import assert_same_trace, corpus

from workbench.cli import main
from workbench.trace import open_trace
from workbench.trace.cluster import FAULT_ENV, connect, parse_cluster, parse_resources, run_driver
from workbench.trace.command import shard_from_env
from workbench.trace.corpus import iter_batches, iter_windows
from workbench.trace.plan import build_plan, scan_file
from workbench.trace.status import store_status

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(600)

FLAGS = ["--batch-tokens", "96", "--chunk-tokens", "32", "--max-seq-len", "40"]
TASK_TOKENS = 100  # about 7 tasks of 1-2 batches each for the corpus below: many more tasks than workers


@pytest.fixture(scope="module")
def client():
    with connect("local:2", None) as c:  # what `--cluster local:2` starts (its environment put back after)
        yield c


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> list[Path]:
    """Two input files (one corpus), a record longer than a window among them."""
    root = tmp_path_factory.mktemp("corpus")
    texts = corpus(40, seed=5, max_words=30)
    texts[7] = " ".join(["expert routes the token"] * 30)  # several windows of 40 tokens
    a, b = root / "a.txt", root / "b.jsonl"
    a.write_text("\n".join(texts[:25]) + "\n")
    b.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts[25:]))
    return [a, b]


@pytest.fixture(scope="module")
def reference(corpus_files, tmp_path_factory) -> Path:
    """The single-process run of the same corpus, on one torch thread like each worker (same float sums)."""
    out = tmp_path_factory.mktemp("ref") / "single.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["trace", "--model", "default-v3", "--input", *map(str, corpus_files), "--out", str(out),
                     *FLAGS, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _set_fault(client, spec: str | None) -> None:
    """Set (or clear) the fault-injection variable in every worker process (a lambda: pickled by value)."""
    client.run(lambda: os.environ.update({FAULT_ENV: spec}) if spec else os.environ.pop(FAULT_ENV, None))


def _drive(client, corpus_files, out, **kwargs):
    args = dict(inputs=corpus_files, out=out, storage_options=None, model="default-v3", sites=None, batch_tokens=96,
                max_seq_len=40, chunk_tokens=32, task_tokens=TASK_TOKENS, resume=False, retries=2, resources=None,
                torch_threads=1, progress=False)
    return run_driver(client, **{**args, **kwargs})


def test_the_plan_cuts_the_single_writer_batches_into_tasks(corpus_files, loaded):
    scans = [scan_file(p, loaded.tokenizer, 40, 0) for p in corpus_files]
    plan = build_plan(corpus_files, scans, batch_tokens=96, max_seq_len=40, chunk_tokens=32, task_tokens=TASK_TOKENS)
    whole = list(iter_batches(iter_windows(corpus_files, loaded.tokenizer, 40, 0), 96))
    assert len(plan.tasks) >= 5
    assert plan.total_tokens == sum(len(ids) for b in whole for _, ids in b)
    assert plan.region_tokens % 32 == 0 and plan.region_tokens >= max(t.tokens for t in plan.tasks)
    # each task, read from its own start, is exactly its run of the single-writer batches
    batches = iter(whole)
    for task in plan.tasks:
        import itertools

        mine = list(iter_batches(itertools.islice(iter_windows(corpus_files, loaded.tokenizer, 40, 0, start=task.start),
                                                  task.skip, task.skip + task.windows), 96))
        want = list(itertools.islice(batches, len(mine)))
        assert mine == want and sum(len(ids) for b in mine for _, ids in b) == task.tokens
    assert next(batches, None) is None
    assert type(plan).from_json(plan.to_json()) == plan


def test_a_cluster_run_with_a_worker_killed_mid_task_equals_the_single_process_run(client, corpus_files, reference,
                                                                                 tmp_path):
    marker = tmp_path / "killed-once"
    _set_fault(client, f"0:1:{marker}")  # task 0's worker process dies after its first commit
    try:
        assert _drive(client, corpus_files, str(tmp_path / "dist.zarr")) == 0
    finally:
        _set_fault(client, None)
    assert marker.exists()  # the worker really died (os._exit, no flush) and its task was re-run elsewhere ...
    starts = [e["start"] for _, e in client.get_events("workbench-trace") if e["task"] == 0 and "start" in e]
    assert len(starts) >= 2 and starts[0] == 0 and starts[-1] > 0  # ... resuming after the first attempt's commit
    got = open_trace(tmp_path / "dist.zarr")
    assert got.attrs["complete"] and got.attrs["writers"] >= 5
    assert_same_trace(got.compute(), open_trace(reference).compute())
    g = zarr.open_group(tmp_path / "dist.zarr", mode="r")
    assert np.asarray(g["progress"][:])[:, 2].all()
    status = store_status(tmp_path / "dist.zarr")
    assert status.complete and status.done == status.regions and status.planned_tokens == status.committed_tokens


def test_the_same_cluster_run_into_s3_with_a_worker_killed(client, corpus_files, reference, tmp_path, s3):
    marker = tmp_path / "killed-once"
    _set_fault(client, f"2:1:{marker}")
    url = s3.url("cluster")
    try:
        assert _drive(client, corpus_files, url, storage_options=s3.options) == 0
    finally:
        _set_fault(client, None)
    assert marker.exists()
    got = open_trace(url, storage_options=s3.options, chunks="auto")
    assert got.attrs["complete"]
    assert_same_trace(got.compute(), open_trace(reference).compute())
    keys = s3.keys(url)
    assert "zarr.json" in keys and not [k for k in keys if k.endswith(".partial")]
    import xarray as xr

    consolidated = xr.open_zarr(url, consolidated=True, storage_options={  # the driver consolidated at the end
        "endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
    assert set(got.data_vars) <= set(consolidated.data_vars)


def test_a_second_driver_of_one_store_is_refused_and_a_finished_one_resumes_as_a_no_op(client, corpus_files,
                                                                                     tmp_path):
    out = str(tmp_path / "dist.zarr")
    assert _drive(client, corpus_files, out) == 0
    with pytest.raises(Exception, match="already exists; pass --resume"):
        _drive(client, corpus_files, out)
    before = sorted((p, p.stat().st_mtime_ns) for p in Path(out).rglob("*") if p.is_file())
    assert _drive(client, corpus_files, out, resume=True) == 0  # every region is done: nothing is submitted
    after = sorted((p, p.stat().st_mtime_ns) for p in Path(out).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert [x for x in before if x[0].name != "zarr.json"] == after


def test_a_killed_driver_is_resumed_without_rerunning_finished_tasks(corpus_files, reference, tmp_path):
    out = tmp_path / "dist.zarr"
    cmd = [sys.executable, "-m", "workbench.cli", "trace", "--model", "default-v3", "--input", *map(str, corpus_files),
           "--out", str(out), *FLAGS, "--task-tokens", "40", "--cluster", "local:2", "--no-progress"]
    # ~25 one-batch tasks: killed at the first finished region, most are still to run
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    rows = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            rows = np.asarray(zarr.open_group(out, mode="r")["progress"][:])
        except Exception:  # not created yet
            rows = None
        if rows is not None and rows[:, 2].any():
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster: the whole machine's run is gone
    proc.wait()
    rows = np.asarray(zarr.open_group(out, mode="r")["progress"][:])
    finished = [i for i in range(len(rows)) if rows[i, 2]]
    assert finished  # killed mid-run: some regions done ...
    status = store_status(out)
    assert not status.complete and status.done == len(finished) and not status.stalled
    later = store_status(out, stalled_after=60, now=time.time() + 3600)  # an hour on, the started regions stall
    assert [r for r, _, _ in later.stalled] == [i for i in range(len(rows)) if rows[i, 0] and not rows[i, 2]]
    assert main(["trace-status", str(out)]) == 0
    assert status.done < status.regions, "the run finished before it was killed"
    stamps = {i: _region_stamps(out, i) for i in finished}
    assert main(["trace", "--model", "default-v3", "--input", *map(str, corpus_files), "--out", str(out), *FLAGS,
                 "--task-tokens", "40", "--cluster", "local:2", "--resume", "--no-progress"]) == 0
    assert {i: _region_stamps(out, i) for i in finished} == stamps  # finished regions were not written again
    got = open_trace(out)
    assert got.attrs["complete"]
    assert_same_trace(got.compute(), open_trace(reference).compute())


def _region_stamps(out: Path, region: int) -> list[tuple[str, int]]:
    """mtimes of the progress row and the token_id chunks of one region (32-token chunks)."""
    rows = np.asarray(zarr.open_group(out, mode="r")["progress"][:])
    region_tokens = int(zarr.open_group(out, mode="r").attrs["region_tokens"])
    first = region * region_tokens // 32
    files = [out / "progress" / "c" / str(region) / "0"]
    files += [out / "token_id" / "c" / str(first + j) for j in range(-(-int(rows[region, 0]) // 32))]
    return [(str(f), f.stat().st_mtime_ns) for f in files]


def test_cluster_flags_are_validated(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    base = ["trace", "--input", str(src), "--out", str(tmp_path / "t.zarr")]
    assert main([*base, "--cluster", "local:0"]) == 2
    assert "expected local:N with N >= 1" in capsys.readouterr().err
    assert main([*base, "--cluster", "local:2", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--cluster", "local:2", "--shard", "0/2"]) == 2
    assert "give one or the other" in capsys.readouterr().err
    assert main([*base, "--cluster", "local:2", "--resources", "GPU"]) == 2
    assert "expected NAME=AMOUNT" in capsys.readouterr().err
    assert parse_cluster("local:3") == 3 and parse_resources("GPU=1,MEM=2") == {"GPU": 1.0, "MEM": 2.0}


def test_shard_auto_reads_torchrun_then_slurm(monkeypatch):
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == (2, 3)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == (0, 2)
    with pytest.raises(ValueError, match="neither RANK/WORLD_SIZE"):
        shard_from_env({})
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE = 4/2"):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "2"})


def test_shard_auto_processes_fill_one_store_equal_to_explicit_shards(tmp_path, corpus_files):
    flags = ["-m", "workbench.cli", "trace", "--model", "default-v3", "--input", *map(str, corpus_files), *FLAGS,
             "--no-progress"]
    auto, explicit = tmp_path / "auto.zarr", tmp_path / "explicit.zarr"
    procs = [subprocess.Popen([sys.executable, *flags, "--out", str(auto), "--shard", "auto"],
                              env={**os.environ, "RANK": str(i), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
             for i in range(2)]
    procs += [subprocess.Popen([sys.executable, *flags, "--out", str(explicit), "--shard", f"{i}/2"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    assert open_trace(auto).attrs["writers"] == 2
    assert_same_trace(open_trace(auto).compute(), open_trace(explicit).compute())


def test_a_local_cluster_leaves_the_drivers_environment_as_it_was():
    before = dict(os.environ)
    with connect("local:1", None) as c:
        assert c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")) == dict.fromkeys(c.scheduler_info()["workers"])
    assert dict(os.environ) == before  # the Nanny's OMP_NUM_THREADS=1 does not leak into the driver's subprocesses


def test_without_cluster_flags_nothing_imports_dask_distributed(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a token routes to an expert\n")
    script = ("import sys; from workbench.cli import main; "
              f"rc = main(['trace', '--model', 'default-v3', '--input', {str(src)!r}, '--out', {str(tmp_path / 't.zarr')!r}, "
              "'--no-progress']); print(rc, 'distributed' in sys.modules, 'obstore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-3:] == ["0", "False", "False"]


def test_scheduler_flag_runs_on_an_existing_cluster(corpus_files, reference, tmp_path):
    """`--scheduler ADDR`: the same run on a cluster somebody else started (here a LocalCluster's scheduler)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        environ = dict(os.environ)
        try:
            assert main(["trace", "--model", "default-v3", "--input", *map(str, corpus_files), "--out",
                         str(tmp_path / "s.zarr"), *FLAGS, "--task-tokens", str(TASK_TOKENS), "--scheduler",
                         cluster.scheduler_address, "--no-progress"]) == 0
        finally:
            os.environ.clear()
            os.environ.update(environ)
    got = open_trace(tmp_path / "s.zarr")
    assert got.attrs["complete"] and got.attrs["writers"] >= 5
    np.testing.assert_array_equal(got.expert_ids.values, open_trace(reference).expert_ids.values)
