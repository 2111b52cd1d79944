"""The REST API against hostile or odd stores and paths: nothing is written outside the root, every bad input gets
the documented 4xx (never a 500) with a short message, nothing a store claims sizes what is read or sent, and slow
work runs off the event loop within a time budget."""

from __future__ import annotations

import ast
import asyncio
import html
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import zarr
from tornado.httpclient import HTTPClientError

from workbench.server import discovery, handlers
from workbench.server.discovery import PathRefusedError
from workbench.server.notebooks import create_notebook

LONG = "LONG"  # stands for a 60 MB path in the tables (built in the test, not at collection)


async def call(jp_fetch, *parts: str, params: dict | None = None, body: object = None) -> tuple[int, dict, float, int]:
    """(status, JSON reply, seconds, reply bytes) of a GET (body None) or POST under /workbench/api/; errors too."""
    started = time.perf_counter()
    kwargs = {"method": "POST", "body": json.dumps(body)} if body is not None else {"params": params or {}}
    try:
        r = await jp_fetch("workbench", "api", *parts, **kwargs)
    except HTTPClientError as e:
        r = e.response
    assert r is not None, "no reply"
    return r.code, json.loads(r.body), time.perf_counter() - started, len(r.body)


@pytest.fixture
def captured_log(jp_serverapp):
    """Every record the server and tornado log during the test, as one string."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    keep = Keep(level=logging.DEBUG)
    loggers = [jp_serverapp.log, *(logging.getLogger(n) for n in ("tornado.access", "tornado.application", "tornado.general"))]
    for logger in loggers:
        logger.addHandler(keep)
    yield records
    for logger in loggers:
        logger.removeHandler(keep)


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in (*dirs, *files))


# --- 1. the server root is itself a trace store ------------------------------------------------------------------

@pytest.mark.parametrize("store", ["", "."])
@pytest.mark.parametrize("kind", ["analysis", "workbench"])
async def test_a_root_that_is_a_store_gets_no_notebook_beside_it(jp_fetch, jp_root_dir, store_template, kind, store):
    shutil.copytree(store_template, jp_root_dir, dirs_exist_ok=True)
    before = files_under(jp_root_dir.parent)
    code, reply, _, _ = await call(jp_fetch, "notebooks", body={"kind": kind, "store": store})
    assert code == 403, reply
    assert "the server root is itself a trace store" in reply["error"]
    assert files_under(jp_root_dir.parent) == before  # nothing written, inside or outside the root
    code, listing, _, _ = await call(jp_fetch, "traces")
    assert code == 200 and listing["stores"] == []
    assert [e["path"] for e in listing["errors"]] == [""] and "itself a trace store" in listing["errors"][0]["error"]


def test_the_notebook_writer_checks_its_target_is_inside_the_root(tmp_path, copy_store):
    root = copy_store(tmp_path / "root")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(PathRefusedError, match="outside the server root"):
        create_notebook("analysis", store=root, root=root)  # would be written beside the root, in tmp_path
    with pytest.raises(PathRefusedError, match="outside the server root"):
        create_notebook("live", folder=outside, root=root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "root"] and not any(outside.iterdir())
    assert create_notebook("live", folder=root, root=root) == root.resolve() / "live-workbench.ipynb"


# --- 2. zarr.json that is JSON but not an object -----------------------------------------------------------------

@pytest.mark.parametrize("meta", ["[1, 2, 3]", '"a string"', "null", "3", '{"attributes": [1]}'])
async def test_store_metadata_that_is_not_an_object_is_one_error_entry(jp_fetch, jp_root_dir, copy_store, meta):
    copy_store(jp_root_dir / "good.zarr")
    odd = jp_root_dir / "odd.zarr"
    odd.mkdir()
    (odd / "zarr.json").write_text(meta)
    code, listing, _, _ = await call(jp_fetch, "traces")
    assert code == 200 and [s["path"] for s in listing["stores"]] == ["good.zarr"]
    assert [e["path"] for e in listing["errors"]] == ["odd.zarr"]
    assert "not a JSON object" in listing["errors"][0]["error"]
    code, summary, _, _ = await call(jp_fetch, "traces", "summary", params={"path": "odd.zarr"})
    assert code == 422 and "not a JSON object" in summary["error"]
    code, made, _, _ = await call(jp_fetch, "notebooks", body={"store": "odd.zarr"})
    assert (code, made) == (422, summary)


# --- 3. slow work runs off the event loop, within a time budget --------------------------------------------------

def _slow(result: object, seconds: float = 2.0):
    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return result
    return slow


@pytest.mark.parametrize(("patched", "parts", "params", "body"), [
    ("find_stores", ("traces",), {}, None),
    ("summarize", ("traces", "summary"), {"path": "a.zarr"}, None),
    ("create_notebook", ("notebooks",), None, {"kind": "live"}),
], ids=["listing", "summary", "notebook"])
async def test_the_server_answers_while_slow_work_runs(jp_fetch, jp_root_dir, copy_store, monkeypatch,
                                                       patched, parts, params, body):
    copy_store(jp_root_dir / "a.zarr")
    result = {"find_stores": {"stores": [], "errors": [], "truncated": False}, "summarize": {"path": "a.zarr"},
              "create_notebook": jp_root_dir / "live-workbench.ipynb"}[patched]
    monkeypatch.setattr(handlers, patched, _slow(result))
    await jp_fetch("api", "status")
    started = time.perf_counter()

    async def status() -> float:
        await asyncio.sleep(0.2)  # the slow request is running by now
        await jp_fetch("api", "status")
        return time.perf_counter() - started - 0.2

    (code, _, slow_seconds, _), status_seconds = await asyncio.gather(
        call(jp_fetch, *parts, params=params, body=body), status())
    assert code in (200, 201) and slow_seconds >= 2.0
    assert status_seconds < 0.5  # before: 1.8 s, waiting behind the slow handler


async def test_a_listing_stops_at_its_time_budget_and_says_so(jp_fetch, jp_root_dir, copy_store, monkeypatch):
    for i in range(6):
        copy_store(jp_root_dir / f"s{i}.zarr")
    monkeypatch.setattr(handlers, "LISTING_BUDGET_S", 1.0)
    opened = discovery._open_trace
    monkeypatch.setattr(discovery, "_open_trace", lambda path: (time.sleep(0.4), opened(path))[1])
    code, listing, seconds, _ = await call(jp_fetch, "traces")
    assert code == 200 and listing["truncated"] is True
    assert 1 <= len(listing["stores"]) < 6
    assert any("time budget" in e["error"] for e in listing["errors"])
    assert seconds < 1.0 + 0.4 + 1.0  # the budget, one store in progress, slack for a loaded machine


async def test_a_listing_stops_at_its_store_and_error_caps(jp_fetch, jp_root_dir, copy_store, monkeypatch):
    for i in range(3):
        copy_store(jp_root_dir / f"s{i}.zarr")
        (jp_root_dir / f"bad{i}.zarr").mkdir()
        (jp_root_dir / f"bad{i}.zarr" / "zarr.json").write_text("{")
    monkeypatch.setattr(discovery, "MAX_STORES", 2)
    monkeypatch.setattr(discovery, "MAX_ERRORS", 1)
    code, listing, _, _ = await call(jp_fetch, "traces")
    assert code == 200 and listing["truncated"] is True and len(listing["stores"]) == 2
    errors = [e["error"] for e in listing["errors"]]
    assert len(errors) == 3, errors  # one error shown, then the count of the others, then why the walk stopped
    assert "more stores or folders could not be read" in errors[1] and "after 2 stores" in errors[2]


async def test_a_summary_over_its_time_budget_is_503(jp_fetch, jp_root_dir, copy_store, monkeypatch):
    copy_store(jp_root_dir / "a.zarr")
    monkeypatch.setattr(handlers, "SUMMARY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(handlers, "summarize", _slow({}, 1.5))
    code, reply, seconds, _ = await call(jp_fetch, "traces", "summary", params={"path": "a.zarr"})
    assert code == 503 and "did not finish within 0.3 s" in reply["error"]
    assert seconds < 1.2


# --- 4. what a store claims never sizes what is read or sent ------------------------------------------------------

def _edit(meta: Path, change) -> None:
    data = json.loads(meta.read_text())
    change(data)
    meta.write_text(json.dumps(data))


def _token_arrays(store: Path) -> list[Path]:
    metas = sorted(store.glob("*/zarr.json"))
    return [m for m in metas if (json.loads(m.read_text()).get("dimension_names") or [""])[0] == "token"]


def claim_tokens(store: Path, n: int, last_chunk: bool = False) -> None:
    """Every token array claims n rows and writer 0 claims n committed tokens; no chunk is written, unless
    `last_chunk`, which copies a chunk file of `token_id` to where the n-th token would be."""
    zarr.open_group(store, mode="r+")["progress"][0, 0] = n
    for meta in _token_arrays(store):
        _edit(meta, lambda d: d["shape"].__setitem__(0, n))
    if last_chunk:
        shutil.copy(store / "token_id" / "c" / "0", store / "token_id" / "c" / str((n - 1) // 4096))


def claim_layout(store: Path, **fields: object) -> None:
    def change(d: dict) -> None:
        layout = json.loads(d["attributes"]["layout"])
        layout.update(fields)
        d["attributes"]["layout"] = json.dumps(layout)
    _edit(store / "zarr.json", change)


def claim_writers(store: Path, n: int) -> None:
    _edit(store / "zarr.json", lambda d: d["attributes"].__setitem__("writers", n))
    _edit(store / "progress" / "zarr.json", lambda d: d["shape"].__setitem__(0, n))


def claim_model(store: Path, **fields: object) -> None:
    def change(d: dict) -> None:
        cfg = json.loads(d["attributes"]["model_config"])
        cfg.update(fields)
        d["attributes"]["model_config"] = json.dumps(cfg)
    _edit(store / "zarr.json", change)


CLAIMS = {
    "1e10 tokens": lambda s: claim_tokens(s, 10**10),
    "1e12 tokens": lambda s: claim_tokens(s, 10**12),
    "1e10 tokens, last chunk present": lambda s: claim_tokens(s, 10**10, last_chunk=True),
    "1e12 layers": lambda s: claim_layout(s, n_layers=10**12),
    "1e12 vocab": lambda s: _edit(s / "vocab_text" / "zarr.json", lambda d: d["shape"].__setitem__(0, 10**12)),
    "1e9 writers": lambda s: claim_writers(s, 10**9),
    "1e9-row chunks": lambda s: _edit(s / "expert_ids" / "zarr.json",
                                      lambda d: d["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 10**9)),
    "1e6 layers in expert_ids": lambda s: _edit(s / "expert_ids" / "zarr.json", lambda d: d["shape"].__setitem__(1, 10**6)),
    "100k-deep array metadata": lambda s: (s / "expert_ids" / "zarr.json").write_text("[" * 100_000 + "]" * 100_000),
    "5 MB store metadata": lambda s: _edit(s / "zarr.json", lambda d: d["attributes"].__setitem__("notes", "x" * 5_000_000)),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
async def test_a_store_claiming_too_much_is_refused_quickly_with_a_short_reply(jp_fetch, jp_root_dir, copy_store, claim):
    copy_store(jp_root_dir / "good.zarr")
    CLAIMS[claim](copy_store(jp_root_dir / "big.zarr"))
    code, listing, seconds, size = await call(jp_fetch, "traces")
    assert code == 200 and [s["path"] for s in listing["stores"]] == ["good.zarr"]
    assert [e["path"] for e in listing["errors"]] == ["big.zarr"]
    assert seconds < 3 and size < 4096, (seconds, size)
    code, reply, seconds, size = await call(jp_fetch, "traces", "summary", params={"path": "big.zarr"})
    assert code == 422 and reply["error"].startswith("cannot read trace store")
    assert seconds < 3 and size < 4096, (seconds, size)


async def test_a_store_claiming_millions_of_experts_gets_a_short_refusal(jp_fetch, jp_root_dir, copy_store):
    claim_model(copy_store(jp_root_dir / "wide.zarr"), n_routed_experts=3_000_000)
    code, listing, _, _ = await call(jp_fetch, "traces")
    assert code == 200 and listing["stores"][0]["experts"] == 3_000_000  # a number in the listing is harmless
    code, reply, seconds, size = await call(jp_fetch, "traces", "summary", params={"path": "wide.zarr"})
    assert code == 422 and "3000000 routed experts" in reply["error"] and str(discovery.SUMMARY_MAX_EXPERTS) in reply["error"]
    assert seconds < 3 and size < 1024  # before: 45 MB


async def test_a_summary_over_the_layer_cap_is_refused(jp_fetch, jp_root_dir, copy_store, monkeypatch):
    copy_store(jp_root_dir / "a.zarr")
    monkeypatch.setattr(discovery, "SUMMARY_MAX_LAYERS", 1)  # the tiny store has 2 MoE layers
    code, reply, _, _ = await call(jp_fetch, "traces", "summary", params={"path": "a.zarr"})
    assert code == 422 and "2 MoE layers" in reply["error"]


async def test_per_expert_load_is_left_out_over_its_cap_and_the_picture_stays(jp_fetch, jp_root_dir, copy_store, monkeypatch):
    copy_store(jp_root_dir / "a.zarr")
    code, full, _, _ = await call(jp_fetch, "traces", "summary", params={"path": "a.zarr"})
    assert code == 200 and len(full["expert_load"]) == 2 and len(full["expert_load"][0]) == 16
    monkeypatch.setattr(discovery, "SUMMARY_MAX_LOAD_CELLS", 31)  # 2 layers x 16 experts = 32
    code, capped, _, _ = await call(jp_fetch, "traces", "summary", params={"path": "a.zarr"})
    assert code == 200 and capped["expert_load"] is None and capped["load_picture"] == full["load_picture"]


# --- 5. paths and names: the documented codes, short messages, nothing logged in full ------------------------------

@pytest.fixture
def odd_root(jp_root_dir, copy_store, tmp_path_factory):
    """The root with a good store and every odd thing the table below asks about."""
    copy_store(jp_root_dir / "a.zarr")
    (jp_root_dir / "loop").symlink_to(jp_root_dir / "loop")
    (jp_root_dir / "ping").symlink_to(jp_root_dir / "pong")
    (jp_root_dir / "pong").symlink_to(jp_root_dir / "ping")
    deep = jp_root_dir / "deep.zarr"
    deep.mkdir()
    (deep / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    copy_store(jp_root_dir / ".git" / "x.zarr")
    copy_store(jp_root_dir / ".hidden" / "c.zarr")
    (jp_root_dir / "seen").symlink_to(jp_root_dir / ".hidden", target_is_directory=True)
    copy_store(jp_root_dir / "run:2024" / "r.zarr")
    outside = copy_store(tmp_path_factory.mktemp("outside") / "o.zarr")
    linked = copy_store(jp_root_dir / "linked.zarr")
    shutil.rmtree(linked / "expert_ids")
    (linked / "expert_ids").symlink_to(outside / "expert_ids", target_is_directory=True)
    partial = copy_store(jp_root_dir / "partial.zarr")
    shutil.rmtree(partial / "expert_weights")
    return jp_root_dir


async def test_the_listing_shows_what_the_summary_serves(jp_fetch, odd_root):
    code, listing, _, _ = await call(jp_fetch, "traces")
    assert code == 200 and listing["truncated"] is False
    assert [s["path"] for s in listing["stores"]] == ["a.zarr", "run:2024/r.zarr"]  # hidden skipped, loops not followed
    errors = {e["path"]: e["error"] for e in listing["errors"]}
    assert sorted(errors) == ["deep.zarr", "linked.zarr", "partial.zarr"]
    assert "nested too deeply" in errors["deep.zarr"]
    assert "expert_ids resolves outside the server root" in errors["linked.zarr"]
    assert "partial store" in errors["partial.zarr"] and str(odd_root) not in errors["partial.zarr"]
    for store in listing["stores"]:
        code, _, _, _ = await call(jp_fetch, "traces", "summary", params={"path": store["path"]})
        assert code == 200, store


PATH_CASES = [  # (endpoint, path or body, code, part of the message)
    ("traces", "loop", 404, "cannot be resolved (a symlink loop)"),
    ("traces", "ping/x", 404, "cannot be resolved (a symlink loop)"),
    ("traces", "nowhere", 404, "is not a folder"),
    ("traces", "a.zarr/zarr.json", 404, "is not a folder"),
    ("traces", "a\x00b", 400, "holds a NUL character"),
    ("traces", "x" * 5000, 400, "longer than 4096"),
    ("traces", "y" * 300, 404, "cannot be resolved (File name too long)"),
    ("traces", ".git", 403, "hidden"),
    ("traces", "seen", 403, "hidden"),
    ("summary", None, 400, "needs 'path'"),
    ("summary", "loop", 404, "cannot be resolved (a symlink loop)"),
    ("summary", "deep.zarr", 422, "nested too deeply"),
    ("summary", "a\x00b", 400, "holds a NUL character"),
    ("summary", ".git/x.zarr", 403, "hidden"),
    ("summary", "seen/c.zarr", 403, "hidden"),
    ("summary", "run:2024/r.zarr", 200, None),
    ("summary", "linked.zarr", 403, "expert_ids resolves outside the server root"),
    ("summary", "partial.zarr", 422, "partial store"),
    ("notebooks", {"store": "loop"}, 404, "cannot be resolved (a symlink loop)"),
    ("notebooks", {"store": "deep.zarr"}, 422, "nested too deeply"),
    ("notebooks", {"store": LONG}, 400, "longer than 4096"),
    ("notebooks", {"store": "a\x00b"}, 400, "holds a NUL character"),
    ("notebooks", {"store": ".hidden/c.zarr"}, 403, "hidden"),
    ("notebooks", {"store": "seen/c.zarr"}, 403, "hidden"),
    ("notebooks", {"kind": "live", "dir": ".git"}, 403, "hidden"),
    ("notebooks", {"kind": "live", "dir": "loop"}, 404, "cannot be resolved (a symlink loop)"),
    ("notebooks", {"store": "run:2024/r.zarr"}, 201, None),
    ("notebooks", {"store": "linked.zarr"}, 403, "expert_ids resolves outside the server root"),
    ("notebooks", {"store": "partial.zarr"}, 422, "partial store"),
]


def _case_id(case: tuple) -> str:
    endpoint, target, code, _ = case
    return f"{endpoint}-{str(target)[:24].encode('unicode_escape').decode()}-{code}"


@pytest.mark.parametrize(("endpoint", "target", "code", "message"), PATH_CASES, ids=[_case_id(c) for c in PATH_CASES])
async def test_paths_get_the_documented_code_and_a_short_message(jp_fetch, odd_root, captured_log,
                                                                 endpoint, target, code, message):
    before = files_under(odd_root)
    if endpoint == "notebooks":
        body = {k: ("z" * 60_000_000 if v == LONG else v) for k, v in target.items()}
        got, reply, _, size = await call(jp_fetch, "notebooks", body=body)
    else:
        parts = ("traces",) if endpoint == "traces" else ("traces", "summary")
        got, reply, _, size = await call(jp_fetch, *parts, params={} if target is None else {"path": target})
    assert got == code, reply
    if message is not None:
        assert message in reply["error"]
        assert size < 2048  # the path is shortened in the message
        assert files_under(odd_root) == before
    log = "\n".join(captured_log)
    assert re.search(rf"\b{got} (GET|POST) /", log) or got < 400  # the access log line is captured ...
    assert not re.search("[xyz]{1000}", log)  # ... and long paths are not logged in full
    assert "Traceback" not in log and not re.search(r"\b5\d\d (GET|POST) ", log)


async def test_notebooks_refuse_what_the_summary_cannot_read_with_the_same_error(jp_fetch, odd_root):
    for store in ("partial.zarr", "deep.zarr", "linked.zarr"):
        summary = await call(jp_fetch, "traces", "summary", params={"path": store})
        made = await call(jp_fetch, "notebooks", body={"kind": "workbench", "store": store})
        assert (made[0], made[1]) == (summary[0], summary[1]), store


NAMES = ["tick`s`.zarr", "<img src=x onerror=alert(1)>.zarr", "line\n# injected\n```\nimport os.zarr",
         "*_[link](javascript:alert(1))_*.zarr", "quote'\"\\back.zarr", "&amp; &lt;.zarr"]


@pytest.mark.parametrize("kind", ["analysis", "workbench"])
@pytest.mark.parametrize("name", NAMES, ids=[n.encode("unicode_escape").decode()[:20] for n in NAMES])
async def test_store_names_cannot_break_out_of_the_notebook(jp_fetch, jp_root_dir, copy_store, name, kind):
    mistune = pytest.importorskip("mistune")
    copy_store(jp_root_dir / name)
    code, reply, _, _ = await call(jp_fetch, "notebooks", body={"kind": kind, "store": name})
    assert code == 201, reply
    nb = nbformat.read(jp_root_dir / reply["path"], as_version=4)
    nbformat.validate(nb)
    rendered = mistune.html(nb.cells[0].source)
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", rendered))
    assert tags <= {"h1", "p"}, rendered  # no code span, image, link, emphasis or raw HTML from the name
    heading = html.unescape(re.search(r"<h1>(.*?)</h1>", rendered, re.S).group(1))
    shown = name.replace("\n", "\\u000a")
    assert heading == ("Analysis of " if kind == "analysis" else "Workbench on ") + shown
    calls = [node for cell in nb.cells if cell.cell_type == "code" for node in ast.walk(ast.parse(cell.source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("open_trace", "Workbench")]
    assert calls and all(
        [ast.literal_eval(a) for a in c.args] + [ast.literal_eval(k.value) for k in c.keywords] == [name] for c in calls)
