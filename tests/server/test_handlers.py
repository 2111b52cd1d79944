"""The REST API against a real jupyter_server: auth, path confinement, corrupt stores, notebook creation."""

from __future__ import annotations

import json
import os

import nbformat
import numpy as np
import pytest
import xarray as xr
from tornado.httpclient import HTTPClientError


@pytest.fixture
def stores(jp_root_dir, tmp_path_factory, copy_store):
    """Two real stores written by `workbench trace`, a corrupt one, a hidden one, and a symlink out of the root.

    They are copies of the session's `tiny-random` store (3 layers, MoE layers 1-2, 16 experts; see conftest.py),
    so the shapes below do not move when the bundled default model is retrained.
    """
    for rel in ("a.zarr", "runs/deep/b.zarr", ".hidden/c.zarr"):
        copy_store(jp_root_dir / rel)
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
    # against the store read by plain xarray.open_zarr and counted with a per-layer loop
    ids = xr.open_zarr(stores / "runs/deep/b.zarr", consolidated=False)["expert_ids"].values  # [n, L, k]
    ref = np.stack([np.bincount(ids[:, l].ravel(), minlength=16) / ids[:, l].size for l in range(ids.shape[1])])
    np.testing.assert_allclose(s["expert_load"], ref, atol=1e-5)  # rounded to 5 decimals on the wire
    picture = s["load_picture"]  # 2 layers x 16 experts fit the 64 x 64 bound: one cell per (layer, expert)
    assert picture["rows"] == [[1, 1], [2, 2]] and picture["cols"] == [[e, e] for e in range(16)]
    np.testing.assert_allclose(picture["cells"], ref * 16, atol=1e-4)  # load relative to uniform (1/16)
    assert picture["max"] == pytest.approx(float((ref * 16).max()), abs=1e-4)


async def test_summary_errors(jp_fetch, stores):
    for path, code in [("runs/broken.zarr", 422), ("runs", 404), ("nowhere.zarr", 404), ("../x", 403)]:
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("workbench", "api", "traces", "summary", params={"path": path})
        assert err.value.code == code, path


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
                                (("notebooks",), "POST", json.dumps({"store": "a.zarr"})),
                                (("notebooks",), "POST", json.dumps({"store": "a.zarr", "kind": "workbench"})),
                                (("notebooks",), "POST", json.dumps({"kind": "live"}))]:
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


async def post_notebook(jp_fetch, body):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = await jp_fetch("workbench", "api", "notebooks", method="POST", body=raw)
    assert r.code == 201
    return json.loads(r.body)


async def test_workbench_notebook_shows_the_dashboard_on_the_store(jp_fetch, stores):
    reply = await post_notebook(jp_fetch, {"store": "runs/deep/b.zarr", "kind": "workbench"})
    assert reply == {"path": "runs/deep/b-workbench.ipynb", "kind": "workbench"}
    nb = nbformat.read(stores / reply["path"], as_version=4)
    nbformat.validate(nb)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert code == ["from workbench.widgets import Workbench\n\nWorkbench(trace='b.zarr')"]  # relative to the notebook


async def test_live_notebook_goes_into_the_folder_asked_for(jp_fetch, stores):
    first = await post_notebook(jp_fetch, {"kind": "live"})
    second = await post_notebook(jp_fetch, {"kind": "live", "dir": ""})
    nested = await post_notebook(jp_fetch, {"kind": "live", "dir": "runs/deep"})
    assert [first["path"], second["path"], nested["path"]] == [
        "live-workbench.ipynb", "live-workbench-1.ipynb", "runs/deep/live-workbench.ipynb"]
    nb = nbformat.read(stores / nested["path"], as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells if c.cell_type == "code"] == ["from workbench.widgets import Workbench\n\nWorkbench()"]


async def test_existing_files_and_links_are_never_written(jp_fetch, stores, tmp_path_factory):
    taken = stores / "a-workbench.ipynb"
    taken.write_text("my own notes")
    outside = tmp_path_factory.mktemp("victim") / "target.ipynb"
    (stores / "a-workbench-1.ipynb").symlink_to(outside)  # dangling link out of the root, named like the next try
    reply = await post_notebook(jp_fetch, {"store": "a.zarr", "kind": "workbench"})
    assert reply["path"] == "a-workbench-2.ipynb"
    assert taken.read_text() == "my own notes"
    assert not outside.exists()


@pytest.mark.parametrize(("body", "code", "message"), [
    ("not json", 400, "the body is not JSON"),
    ("[1, 2]", 400, "the body must be a JSON object, got list"),
    ({"kind": "report", "store": "a.zarr"}, 400, "unknown notebook kind 'report'; known: ['analysis', 'workbench', 'live']"),
    ({"kind": "workbench"}, 400, "a 'workbench' notebook needs 'store'"),
    ({"kind": "analysis", "store": 3}, 400, "'store' must be a path string, got 3"),
    ({"kind": "live", "dir": None}, 400, "'dir' must be a path string, got None"),
    ({"kind": "live", "dir": "a.zarr/zarr.json"}, 404, "is not a folder"),
    ({"kind": "live", "dir": "../"}, 403, "'..' is refused"),
    ({"kind": "live", "dir": "escape"}, 403, "resolves outside the server root"),
    ({"kind": "workbench", "store": "runs"}, 404, "'runs' is not a trace store"),
    ({"kind": "workbench", "store": "runs/broken.zarr"}, 422, "cannot read trace store"),
])
async def test_bad_notebook_requests_name_the_problem_and_write_nothing(jp_fetch, stores, body, code, message):
    before = sorted(p.relative_to(stores) for p in stores.rglob("*"))
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("workbench", "api", "notebooks", method="POST",
                       body=body if isinstance(body, str) else json.dumps(body))
    assert err.value.code == code
    assert message in json.loads(err.value.response.body)["error"]
    assert sorted(p.relative_to(stores) for p in stores.rglob("*")) == before
