"""Every analysis on a dask-chunked trace (small, uneven chunks; on the default scheduler and on a real two-process
LocalCluster) equals the same trace in memory, and building a graph over 10^7 tokens stays O(chunks) and fast.

Integer results must be equal; floats within 1e-6 relative: lifts are exact functions of the (equal) integer
counts, and the other floats are sums of the same per-token terms in another order, which moves a float64 sum by
~1e-15 and a float32 mean (mass_split, stream_mixing over 96 tokens) by ~1e-7 relative. Singular values also get
an absolute 1e-6 * s_max: eigvalsh of a Gram matrix G perturbed by ~1e-16 |G| moves the smallest singular
values by up to ~1e-8 s_max.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from tests.trace.trace_helpers import corpus, in_memory
from workbench import analysis, chunked
from workbench.loader import load_model
from workbench.trace import Trace

distributed = pytest.importorskip("distributed")

SITES = ["expert_ids", "expert_weights", "kv_latent"]
CHUNKINGS = [{"token": 37}, {"token": 100}, {"token": 53, "layer": 2, "layer_all": 1}]  # all uneven at the end
# workers start slowly (each imports workbench); without pytest-timeout the mark would be unknown (--strict-markers)
TIMEOUT = pytest.mark.timeout(300) if importlib.util.find_spec("pytest_timeout") else pytest.mark.usefixtures()


@pytest.fixture(scope="module")
def mem() -> xr.Dataset:
    """A V3 trace of the bundled tiny model (583 tokens), numpy-backed."""
    return in_memory(load_model("default-v3"), corpus(40, seed=3), SITES)


@pytest.fixture(scope="module")
def v4_mem() -> xr.Dataset:
    """A V4 trace (hash-routed layers, indexer selections, mHC mixing) of 96 tokens, numpy-backed."""
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4"), seed=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ids[:, 24:] = ids[:, :24]  # repeated ids: the lift and specialisation tables have counts above 1
    t = Trace(model, ["all"])
    with t:
        t.forward(ids)
    return t.to_xarray()


@pytest.fixture(scope="module")
def cluster_client():
    """One two-process LocalCluster for the module; a Client makes it dask's default scheduler. The Nanny leaves
    OMP_NUM_THREADS=1 ... in this process's environment: put back, so later tests' subprocesses are unaffected."""
    environ = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client
    os.environ.clear()
    os.environ.update(environ)


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Equal integers / strings, floats within 1e-6 relative (NaN where NaN), for xarray objects and dicts."""
    if isinstance(want, dict):
        assert list(got.items()) == list(want.items()), path  # token_texts: same ids, texts and order
        return
    got, want = got.compute(), want.compute()
    if isinstance(want, xr.Dataset):
        assert set(got.variables) == set(want.variables), path
        for name in want.variables:
            assert_same(got[name].variable, want[name].variable, f"{path}.{name}")
        return
    assert got.dims == want.dims and got.shape == want.shape, path
    a, b = np.asarray(got.values), np.asarray(want.values)
    if b.dtype.kind in "iub":
        assert a.dtype.kind in "iub", path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif b.dtype.kind == "f":
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=path)
    else:
        assert [str(x) for x in a.ravel()] == [str(x) for x in b.ravel()], path


def _lift_table(ds: xr.Dataset) -> xr.Dataset:
    return analysis.token_expert_lift(ds, min_count=1)


V3_ANALYSES: dict[str, Callable[[xr.Dataset], Any]] = {
    "expert_load": analysis.expert_load,
    "load_balance": analysis.load_balance,
    "coactivation": analysis.coactivation,
    "routing_transitions": analysis.routing_transitions,
    "token_expert_lift": _lift_table,
    "token_expert_lift_min2": lambda ds: analysis.token_expert_lift(ds, min_count=2),
    "top_tokens_per_expert": lambda ds: analysis.top_tokens_per_expert(ds, n=4, min_count=2),
    "token_texts": lambda ds: analysis.token_texts(ds, np.unique(ds.token_id.values)[::3]),
    "routing_specialisation": analysis.routing_specialisation,
}
V4_ANALYSES: dict[str, Callable[[xr.Dataset], Any]] = {
    "expert_load": analysis.expert_load,
    "token_expert_lift": _lift_table,
    "routing_specialisation": lambda ds: analysis.routing_specialisation(ds, shuffle_seed=7),
    "selection_distance_summary": lambda ds: analysis.selection_distance_summary(ds, bins=np.array([0, 2, 8, 64])),
    "mass_split": analysis.mass_split,
    "stream_mixing": analysis.stream_mixing,
}


def assert_spectrum_same(got: xr.Dataset, want: xr.Dataset) -> None:
    sv, want_sv = got.singular_values.values, want.singular_values.values  # [A, C]
    np.testing.assert_allclose(sv, want_sv, rtol=1e-6, atol=1e-6 * want_sv.max())
    np.testing.assert_allclose(got.effective_rank.values, want.effective_rank.values, rtol=1e-6)


def _check_v3(mem: xr.Dataset, chunked: xr.Dataset) -> None:
    assert chunked.expert_ids.chunks is not None and len(chunked.expert_ids.chunks[0]) > 2
    for name, fn in V3_ANALYSES.items():
        assert_same(fn(chunked), fn(mem), name)
    for center in (False, True):
        assert_spectrum_same(analysis.latent_spectrum(chunked, center=center), analysis.latent_spectrum(mem, center))


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_chunked_v3_equals_in_memory(mem, chunks):
    _check_v3(mem, mem.chunk(chunks))


def test_token_texts_and_lift_see_every_chunk(mem):
    """Ids first seen after the first chunk are found at their first occurrence, in order of it, and the lift
    table counts every (token, slot) choice of every chunk."""
    chunked = mem.chunk({"token": 37})
    tok = mem.token_id.values
    uniq, first = np.unique(tok, return_index=True)
    late = uniq[first >= 37]  # first seen in a later chunk
    assert len(late) > 0
    texts = analysis.token_texts(chunked, late)
    assert list(texts) == sorted(late.tolist(), key=lambda t: first[uniq == t][0])
    assert all(texts[t] == str(mem.text.values[first[uniq == t][0]]) for t in texts)
    lift = analysis.token_expert_lift(chunked)
    assert int(lift["count"].sum()) == int((mem.expert_ids.values >= 0).sum())


@pytest.mark.parametrize("chunks", [{"token": 37}, {"token": 16, "layer": 1, "index_layer": 1}], ids=str)
def test_chunked_v4_equals_in_memory(v4_mem, chunks):
    chunked = v4_mem.chunk(chunks)
    for name, fn in V4_ANALYSES.items():
        assert_same(fn(chunked), fn(v4_mem), name)


@TIMEOUT
def test_on_local_cluster_equals_in_memory(cluster_client, mem):
    """With a Client the analyses run on its workers (the task stream sees them) and give the in-memory result."""
    chunked = mem.chunk({"token": 37})
    with distributed.get_task_stream(cluster_client) as stream:
        _check_v3(mem, chunked)
    chunks = len(chunked.token_id.chunks[0])
    assert len(stream.data) >= chunks  # at least the per-chunk tasks of one analysis ran on the workers


@TIMEOUT
def test_v4_on_local_cluster_equals_in_memory(cluster_client, v4_mem):
    chunked = v4_mem.chunk({"token": 37})
    for name, fn in V4_ANALYSES.items():
        assert_same(fn(chunked), fn(v4_mem), name)


# ---------------------------------------------------------------------- graph size at 10^7 tokens
N_BIG = 10**7
# 2^16 tokens: 153 chunks, the last one short; 2^10: 9766 chunks, where the old path took 3.7 s to build (0.05 s now)
CHUNK_SIZES = [2**16, 2**10]


def _synthetic(n: int, chunk: int, L: int = 26, k: int = 6, E: int = 64) -> xr.Dataset:
    """A lazy routing trace made of dask arrays that are never materialised."""
    ids = da.zeros((n, L, k), dtype=np.int16, chunks=(chunk, L, k))  # [N, L, k]
    tok = da.zeros((n,), dtype=np.int32, chunks=(chunk,))  # [N]
    return xr.Dataset({"expert_ids": (("token", "layer", "slot"), ids)},
                      coords={"layer": np.arange(1, L + 1), "token_id": ("token", tok)},
                      attrs={"layout": f'{{"n_experts": {E}}}'})


def _tasks_and_seconds(build: Callable[[], da.Array]) -> tuple[int, float]:
    start = time.perf_counter()
    x = build()
    return len(x.__dask_graph__()), time.perf_counter() - start


# Measured with dask 2026.8: 3 tasks per chunk (the input, the per-chunk count, the per-chunk step of dask's sum)
# plus the tree (fan-in 4: ~B/3), 3.34 B in all (512 for B = 153); the old list of from_delayed parts took 5.3 B
# (818). 4 B + 8 allows a change of dask's fan-in but fails on one more task per chunk, and on the old path.
TASKS_PER_CHUNK, TASKS_CONST = 4, 8


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("name", ["expert_load", "coactivation", "routing_transitions"])
def test_dense_graph_is_o_chunks_and_fast(name, chunk):
    ds = _synthetic(N_BIG, chunk)
    chunks = ds.expert_ids.data.numblocks[0]
    assert chunks == -(-N_BIG // chunk)

    def build() -> da.Array:
        out = getattr(analysis, name)(ds)
        return (out if isinstance(out, xr.DataArray) else out["count"]).data

    tasks, seconds = _tasks_and_seconds(build)
    assert tasks <= TASKS_PER_CHUNK * chunks + TASKS_CONST, tasks
    assert seconds < 2.0


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_sparse_merge_graph_is_o_chunks_and_fast(chunk):
    """token_expert_lift's merge (token_texts' is the same helper): the same bound, via the lazy graph it
    computes."""
    ds = _synthetic(N_BIG, chunk)
    chunks = ds.expert_ids.data.numblocks[0]
    L, E = ds.sizes["layer"], analysis.n_experts(ds)
    ids = ds.expert_ids.transpose("token", "layer", "slot")
    tasks, seconds = _tasks_and_seconds(
        lambda: chunked.merge_graph(analysis._lift_frames(L, E), [ds.token_id, ids], (np.add,) * 3))
    assert tasks <= TASKS_PER_CHUNK * chunks + TASKS_CONST + chunks, tasks  # + token_id's own input tasks
    assert seconds < 2.0


def test_merge_graph_computes_what_numpy_does():
    """The lazy merge of a small synthetic trace (random ids, -1 layers) equals the numpy path's frames."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 8, size=(1000, 3, 2)).astype(np.int16)  # [N, L, k], -1 = not captured
    tok = rng.integers(0, 50, size=1000).astype(np.int32)  # [N]
    ds = xr.Dataset({"expert_ids": (("token", "layer", "slot"), ids)},
                    coords={"layer": [1, 2, 3], "token_id": ("token", tok)}, attrs={"layout": '{"n_experts": 8}'})
    lazy = ds.chunk({"token": 99})
    frames = analysis._lift_frames(3, 8)
    want = chunked.merge_blocks(frames, [ds.token_id, ds.expert_ids], (np.add,) * 3)
    got = chunked.merge_graph(frames, [lazy.token_id, lazy.expert_ids], (np.add,) * 3).compute()[0]
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gk, wk)
        np.testing.assert_array_equal(gv, wv)
    assert int(want[0][1].sum()) == int((ids >= 0).sum())
