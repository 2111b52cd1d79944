"""`workbench demo`: JupyterLab on loopback with a token (started, checked, stopped), the headless run that writes a
trace store, the work dir that never overwrites a user's notebook, and clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from workbench import demo
from workbench.cli import main
from workbench.loader import load_model
from workbench.model.costs import kv_bytes_per_token

LISTEN = "0A"  # TCP state in /proc/net/tcp


@pytest.fixture
def lab_env(tmp_path: Path) -> dict[str, str]:
    """The server's environment with HOME and Jupyter's runtime dir in a temp dir (no user config read or written)."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    env.pop("JUPYTER_CONFIG_DIR", None)
    return env


def _status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"token {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _listeners(port: int) -> list[tuple[str, str]]:
    """(table, local address hex) of every socket listening on `port`, from the kernel's own socket tables."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == LISTEN:
                found.append((table, address))
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------- JupyterLab
def test_lab_answers_with_token_only_on_loopback_and_stops(tmp_path: Path, lab_env: dict[str, str]) -> None:
    demo.prepare_workdir(tmp_path / "work")
    with demo.start_lab(tmp_path / "work", env=lab_env) as server:
        status_url = f"{server.base_url}/api/status"
        assert _status(status_url, server.token) == 200
        assert _status(status_url, None) == 403
        assert _status(status_url, "not-the-token") == 403
        contents = f"{server.base_url}/api/contents/{demo.QUICKSTART}"
        assert _status(contents, server.token) == 200  # Lab's root is the work dir holding the quickstart
        assert server.url().startswith(f"http://127.0.0.1:{server.port}/lab/tree/quickstart.ipynb?token=")
        if Path("/proc/net/tcp").exists():
            assert _listeners(server.port) == [("tcp", "0100007F")]  # 127.0.0.1 only, no IPv6, no 0.0.0.0
        assert server.token not in " ".join(server.process.args)  # type: ignore[arg-type]  # not visible in ps
    assert server.process.poll() is not None
    assert not _port_open(server.port)


@pytest.mark.slow
def test_demo_command_prints_url_and_stops_on_ctrl_c(tmp_path: Path, lab_env: dict[str, str]) -> None:
    """The real command in a terminal-like child: it prints a working URL, and SIGINT (Ctrl-C) stops Lab cleanly."""
    cmd = [sys.executable, "-m", "workbench.cli", "demo", "--workdir", str(tmp_path / "work"), "--no-browser"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=lab_env, text=True)
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + demo.START_TIMEOUT_S
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            match = re.search(r"(http://127\.0\.0\.1:(\d+)/lab/tree/quickstart\.ipynb\?token=(\S+))", line)
            if match:
                url, port, token = match.group(1), int(match.group(2)), match.group(3)
        assert url is not None, "no URL printed:\n" + "".join(lines)
        assert _status(f"http://127.0.0.1:{port}/api/status", token) == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped" in out
    assert not _port_open(port)
    assert sorted(p.name for p in (tmp_path / "work").glob("*.ipynb")) == sorted(
        p.name for p in demo.examples_dir().glob("*.ipynb"))


def test_port_in_use_is_a_clear_error(tmp_path: Path, lab_env: dict[str, str]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"JupyterLab exited .*log") as err:
            demo.start_lab(tmp_path, port=port, env=lab_env)
    assert str(port) in str(err.value)  # the log's own words name the port


# ---------------------------------------------------------------------- the work dir
def test_workdir_gets_every_example_and_keeps_user_edits(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    mine = work / demo.QUICKSTART
    mine.write_text("my edited notebook")
    copied = demo.prepare_workdir(work)
    examples = sorted(p.name for p in demo.examples_dir().glob("*.ipynb"))
    assert sorted(p.name for p in copied) == [n for n in examples if n != demo.QUICKSTART]
    assert mine.read_text() == "my edited notebook"
    assert demo.prepare_workdir(work) == []


def test_workdir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--headless", "--workdir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--workdir" in err and "not a directory" in err
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------- headless
@pytest.mark.slow
def test_headless_writes_a_store_with_the_quickstart_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import workbench

    work = tmp_path / "work"
    assert main(["demo", "--headless", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    store, executed = work / "quickstart.zarr", work / demo.HEADLESS_OUTPUT
    assert str(store) in out and str(executed) in out
    ds = workbench.open_trace(store)
    loaded = load_model("default")
    bos = [] if loaded.model.config.bos_token_id is None else [loaded.model.config.bos_token_id]
    texts = [json.loads(line)["text"] for line in (work / "quickstart.jsonl").read_text().splitlines()]
    assert ds["token_id"].values.tolist() == [t for text in texts for t in bos + loaded.tokenizer.encode(text)]
    assert ds.attrs["complete"]
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    assert (work / demo.QUICKSTART).read_bytes() == (demo.examples_dir() / demo.QUICKSTART).read_bytes()


def test_headless_failure_keeps_the_partial_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("assert x == 2, 'the claim failed'")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, examples / demo.QUICKSTART)
    monkeypatch.setattr(demo, "examples_dir", lambda: examples)
    work = tmp_path / "work"
    assert main(["demo", "--headless", "--workdir", str(work)]) == 1
    err = capsys.readouterr().err
    assert "the claim failed" in err and str(work / demo.HEADLESS_OUTPUT) in err
    partial = nbformat.read(work / demo.HEADLESS_OUTPUT, as_version=4)
    assert partial.cells[1].outputs[0].output_type == "error"


# ---------------------------------------------------------------------- terminal summary
@pytest.mark.parametrize("name", ["default", "default-v3"])
def test_summary_prints_routing_and_kv(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main(["demo", "--summary", "--new-tokens", "4", "--model", name]) == 0
    out = capsys.readouterr().out
    model = load_model(name).model
    assert "routing (expert load per MoE layer" in out
    assert all(f"layer {layer}:" in out for layer in model.config.moe_layers)
    if model.config.is_v4:  # no latent: V4's own cache parts at the prompt's length
        S = int(re.search(r"prompt: (\d+) tokens", out).group(1))
        kv = kv_bytes_per_token(model.config, 2, context=S)
        assert f"window {kv['window']:.1f} B + compressed {kv['compressed']:.0f} B + indexer {kv['indexer']:.0f} B" in out
    else:
        kv = model.kv_bytes_per_token(dtype_bytes=2)
        assert f"MLA {kv['mla']:.0f} B vs MHA {kv['mha']:.0f} B ({kv['mha'] / kv['mla']:.1f}x)" in out


def test_summary_options_without_summary_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--model", "tiny", "--workdir", str(tmp_path / "work")]) == 2
    assert "--model only apply with --summary" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before anything was copied or started


# ---------------------------------------------------------------------- in a real browser
class _HarnessAddress:
    """What tests/browser/harness.py's page helpers need of a server: `url(path)` with the token."""

    def __init__(self, server: demo.LabServer) -> None:
        self.server = server

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.server.base_url}/{path.lstrip('/')}{sep}token={self.server.token}"


@pytest.mark.browser
@pytest.mark.skipif(os.environ.get("WORKBENCH_BROWSER_TESTS") == "0", reason="WORKBENCH_BROWSER_TESTS=0")
def test_quickstart_runs_in_lab_in_chromium(tmp_path: Path, lab_env: dict[str, str]) -> None:
    """What `make demo` promises: the quickstart, opened from the demo's server in a real browser, runs every cell
    without an error, shows the dashboard, and the page never requests anything off this machine."""
    from playwright.sync_api import sync_playwright

    from tests.browser.harness import CHROMIUM, CHROMIUM_ARGS, is_offsite, open_notebook, run_all_cells, shot

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing (`make install-browser`, or WORKBENCH_BROWSER_TESTS=0)"
    work = tmp_path / "work"
    demo.prepare_workdir(work)
    requested: list[str] = []
    with demo.start_lab(work, env=lab_env, extra_args=["--LabApp.expose_app_in_browser=True"]) as server, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("request", lambda r: requested.append(r.url))
            open_notebook(page, _HarnessAddress(server), demo.QUICKSTART)  # type: ignore[arg-type]
            errors = run_all_cells(page)
            page.wait_for_selector(".jp-OutputArea-output .jupyter-widgets", timeout=60_000)
            shot(page, "demo-quickstart")
            news_toasts = page.get_by_text("official Jupyter news").count()  # Lab's first-start question
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requested if is_offsite(u)] == []
    assert news_toasts == 0


def test_lab_settings_copy_the_users_once_and_turn_the_news_feed_off(tmp_path, lab_env):
    home_settings = Path(lab_env["HOME"]) / ".jupyter/lab/user-settings"
    theme = home_settings / "@jupyterlab/apputils-extension/themes.jupyterlab-settings"
    theme.parent.mkdir(parents=True)
    theme.write_text('{"theme": "JupyterLab Dark"}')
    before = sorted(p.relative_to(home_settings) for p in home_settings.rglob("*"))
    got = demo.lab_settings(tmp_path, lab_env)
    assert got == tmp_path / ".jupyter-lab-settings"
    assert (got / theme.relative_to(home_settings)).read_text() == theme.read_text()  # the user's theme carries over
    news = got / demo.NOTIFICATION_SETTINGS
    assert '"fetchNews": "false"' in news.read_text()
    assert sorted(p.relative_to(home_settings) for p in home_settings.rglob("*")) == before  # home untouched
    news.write_text('{"fetchNews": "true"}')  # a choice made in the demo's Lab is kept on the next start
    demo.lab_settings(tmp_path, lab_env)
    assert news.read_text() == '{"fetchNews": "true"}'
    chosen = tmp_path / "elsewhere"
    assert demo.user_settings_dir({**lab_env, demo.SETTINGS_ENV: str(chosen)}) == chosen
