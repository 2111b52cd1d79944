"""Scale-out costs on one machine, each against a named alternative measured in the same run:

1. `workbench trace` throughput (tokens/s) on a dask LocalCluster of 1 and of 2 worker processes (1 torch thread
   each) against the single-process path (all cores), the same corpus and flags, interleaved;
2. the single-process trace into S3 (moto's server on 127.0.0.1) against the same trace on local disk;
3. the task graph of `analysis.expert_load` at 10^6 and 10^7 tokens (planned, not computed), with dask chunks as
   stored (4,096 tokens) and as `open_trace(..., chunks="auto")` makes them.
Medians of REPEATS runs; `python benchmarks/bench_scale.py` (about 3 minutes on 2 cores). Needs the `cluster`
and `s3` extras and moto (the test extra).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3
RECORDS = 1500  # about 40k tokens of the bundled model's tokenizer
FLAGS = ["--batch-tokens", "2048", "--max-seq-len", "256", "--no-progress"]
WORDS = ["the", "expert", "routes", "a", "token", "to", "latent", "space", "while", "loss", "falls", "and", "weights",
         "scale", "over", "many", "layers", "of", "attention", "with", "compressed", "entries"]


def corpus(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
                              for _ in range(RECORDS)) + "\n")
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    import dask
    from distributed import Client, LocalCluster

    from workbench.cli import main as cli
    from workbench.trace import open_trace
    from workbench.trace.cluster import TRIM_SETTING, run_driver

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    src = corpus(root / "corpus.txt")
    runs = iter(range(10 ** 6))

    def single(out: str, *extra: str) -> None:
        assert cli(["trace", "--input", str(src), "--out", out, *FLAGS, *extra]) == 0

    def fresh(name: str) -> str:
        path = root / f"{name}-{next(runs)}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        return str(path)

    results: dict[str, list[float]] = {}
    with Quiet():
        single(fresh("warm"))
    tokens = open_trace(root / "warm-0.zarr").sizes["token"]
    print(f"corpus: {RECORDS} records, {tokens} tokens; torch threads in the single process: "
          f"{__import__('torch').get_num_threads()}")

    with dask.config.set({TRIM_SETTING: None}):  # as `--cluster local:N` starts its workers
        clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None) for n in (1, 2)}
    clients = {n: Client(c) for n, c in clusters.items()}
    try:
        def on_cluster(n: int) -> None:
            assert run_driver(clients[n], inputs=[src], out=fresh(f"c{n}"), storage_options=None, model="default",
                              sites=None, batch_tokens=2048, max_seq_len=256, chunk_tokens=4096, task_tokens=4096,
                              resume=False, retries=2, resources=None, torch_threads=1, progress=False) == 0

        variants = {"single process": lambda: single(fresh("single")), "1 worker": lambda: on_cluster(1),
                    "2 workers": lambda: on_cluster(2)}
        for fn in variants.values():
            with Quiet():
                fn()  # warm: each worker loads its model replica once
        order = list(variants)
        rng = random.Random(0)
        for _ in range(REPEATS):
            rng.shuffle(order)
            for name in order:
                with Quiet():
                    results.setdefault(name, []).append(timed(variants[name]))
    finally:
        for c in clients.values():
            c.close()
        for c in clusters.values():
            c.close()
    print_table("run", results, "single process", tokens)
    s3_row(single, fresh, tokens)
    graph_rows()
    shutil.rmtree(root, ignore_errors=True)


def s3_row(single, fresh, tokens) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    options = json.dumps({"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"})
    times: dict[str, list[float]] = {"local disk": [], "S3 (moto, 127.0.0.1)": []}
    n = iter(range(10 ** 6))
    try:
        for _ in range(REPEATS):
            with Quiet():
                times["local disk"].append(timed(lambda: single(fresh("disk"), "--chunk-tokens", "65536")))
                times["S3 (moto, 127.0.0.1)"].append(timed(lambda: single(
                    f"s3://bench/run-{next(n)}.zarr", "--storage-options", options)))
    finally:
        server.stop()
    print_table("store (single process, 65,536-token chunks)", times, "local disk", tokens)


def print_table(what: str, times: dict[str, list[float]], peer: str, tokens: int) -> None:
    """One markdown row per variant: median seconds, tokens/s, and the ratio against `peer` of the same run."""
    import numpy as np

    base = float(np.median(times[peer]))
    print(f"\n| {what} | median s | tokens/s | vs {peer} |\n|---|---:|---:|---:|")
    for name, t in times.items():
        med = float(np.median(t))
        print(f"| {name} | {med:.2f} | {tokens / med:,.0f} | x{base / med:.2f} |")


def graph_rows() -> None:
    import dask.array as da
    import xarray as xr

    from workbench import analysis

    print("\n| tokens | dask chunk (tokens) | chunks | expert_load tasks | tasks per chunk | build s |\n"
          "|---:|---:|---:|---:|---:|---:|")
    L, k, E = 58, 8, 256  # DeepSeek-V3's MoE layers, top-k and experts
    auto = max(4096, (128 << 20) // (L * k * 2) // 4096 * 4096)  # what chunks="auto" gives expert_ids (int16)
    for n in (10 ** 6, 10 ** 7):
        for chunk in (4096, auto):
            ids = da.zeros((n, L, k), dtype="int16", chunks=(chunk, L, k))
            ds = xr.Dataset({"expert_ids": (("token", "layer", "slot"), ids)}, coords={"layer": list(range(3, 3 + L))},
                            attrs={"layout": json.dumps({"n_experts": E})})
            t0 = time.perf_counter()
            graph = analysis.expert_load(ds).data.__dask_graph__()
            built = time.perf_counter() - t0
            chunks = ids.numblocks[0]
            print(f"| {n:,} | {chunk:,} | {chunks:,} | {len(graph):,} | {len(graph) / chunks:.2f} | {built:.3f} |")


class Quiet:
    """Silence stdout and stderr (the commands' summaries, dask's logs) around a timed run."""

    def __enter__(self) -> None:
        self._saved = os.dup(1), os.dup(2)
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        os.close(self._saved[0])
        os.close(self._saved[1])


if __name__ == "__main__":
    main()
