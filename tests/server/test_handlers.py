"""The REST API against a real jupyter_server: auth, path confinement, corrupt stores, notebook creation."""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from tornado.httpclient import HTTPClientError

from workbench.cli import main as workbench_cli


@pytest.fixture
def stores(jp_root_dir, tmp_path_factory):
    """Two real stores written by `workbench trace`, a corrupt one, a hidden one, and a symlink out of the root."""
    corpus = tmp_path_factory.mktemp("input") / "in.txt"
    corpus.write_text("def f(x):\n    return x + 1\nthe expert routes a token\n")
    (jp_root_dir / "runs" / "deep").mkdir(parents=True)
    for rel in ("a.zarr", "runs/deep/b.zarr", ".hidden/c.zarr"):
        assert workbench_cli(["trace", "--input", str(corpus), "--out", str(jp_root_dir / rel)]) == 0
    bad = jp_root_dir / "runs" / "broken.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ this is not json")
    outside = tmp_path_factory.mktemp("outside")
    (jp_root_dir / "escape").symlink_to(outside, target_is_directory=True)
    return jp_root_dir


async def test_lists_stores_and_reports_corrupt_ones(jp_fetch, stores):
    r = await jp_fetch("workbench", "api", "traces")
    data = json.loads(r.body)
    paths = [s["path"] for s in data["stores"]]
    assert paths == ["a.zarr", "runs/deep/b.zarr"]  # hidden folder skipped, symlink not followed
    a = data["stores"][0]
    assert a["complete"] is True and a["tokens"] > 20 and a["experts"] == 16 and a["layers"] == 3
    assert data["errors"] == [{"path": "runs/broken.zarr", "error": data["errors"][0]["error"]}]
    assert "unreadable store metadata" in data["errors"][0]["error"]


async def test_summary_has_expert_load(jp_fetch, stores):
    r = await jp_fetch("workbench", "api", "traces", "summary", params={"path": "runs/deep/b.zarr"})
    s = json.loads(r.body)
    assert s["moe_layers"] == [1, 2]
    assert len(s["expert_load"]) == 2 and len(s["expert_load"][0]) == 16
    assert sum(s["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("path", ["../", "..", "/etc", "runs/../../x", "escape", "escape/x.zarr"])
async def test_paths_escaping_the_root_are_refused(jp_fetch, stores, path):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("workbench", "api", "traces", params={"path": path})
    assert err.value.code == 403
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("workbench", "api", "notebooks", method="POST", body=json.dumps({"store": path}))
    assert err.value.code == 403


async def test_every_endpoint_requires_authentication(jp_fetch, stores):
    for parts, method, body in [(("traces",), "GET", None), (("traces", "summary"), "GET", None),
                                (("notebooks",), "POST", json.dumps({"store": "a.zarr"}))]:
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("workbench", "api", *parts, method=method, body=body, params={"path": "a.zarr"},
                           headers={"Authorization": "token wrong"})
        assert err.value.code == 403


async def test_analysis_notebook_is_created_beside_the_store_and_never_overwrites(jp_fetch, stores):
    before = set(os.listdir(stores))
    r1 = await jp_fetch("workbench", "api", "notebooks", method="POST", body=json.dumps({"store": "a.zarr"}))
    r2 = await jp_fetch("workbench", "api", "notebooks", method="POST", body=json.dumps({"store": "a.zarr"}))
    assert r1.code == 201
    p1, p2 = json.loads(r1.body)["path"], json.loads(r2.body)["path"]
    assert (p1, p2) == ("a-analysis.ipynb", "a-analysis-1.ipynb")
    assert set(os.listdir(stores)) - before == {p1, p2}
    nb = nbformat.read(stores / p1, as_version=4)
    nbformat.validate(nb)
    assert "open_trace('a.zarr')" in nb.cells[1].source
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("workbench", "api", "notebooks", method="POST", body=json.dumps({"store": "runs"}))
    assert err.value.code == 404


async def test_analysis_notebook_runs(jp_fetch, stores):
    nbclient = pytest.importorskip("nbclient")
    r = await jp_fetch("workbench", "api", "notebooks", method="POST", body=json.dumps({"store": "a.zarr"}))
    path = stores / json.loads(r.body)["path"]
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(stores)}}).execute()
    assert any(o.get("output_type") == "execute_result" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
