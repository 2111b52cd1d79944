"""Browser-test machinery: a real JupyterLab on loopback and Debian's Chromium driven by Playwright.

Pages record the requests they make (the `page` fixture fails a test if any left the machine: a view that needs a
CDN is broken for an offline user). Screenshots go to artifacts/browser/ (git-ignored). Chromium comes from Debian
(`apt-get install chromium`), never from `playwright install`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
LOCAL_SCHEMES = {"data", "blob", "about", "chrome-error"}
SERVER_START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, *, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers (any HTTP status); fail early with the log if the process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered, just not 2xx (e.g. 403 without a token): the server is up
        except OSError as e:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text()[-4000:] if log and log.exists() else ""
                raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}") from e
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s") from e
            time.sleep(0.2)


@contextlib.contextmanager
def served_app(log: Path, *args: str) -> Iterator[str]:
    """`workbench serve ARGS` on a free loopback port, from the repo root, its output in `log`: yields the app's URL
    once it answers, and stops the server (terminate, then kill) however the block ends."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
                                env=dict(os.environ), start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/", timeout_s=180, proc=proc, log=log)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class LabServer:
    """A JupyterLab process on 127.0.0.1 with a fresh token, its root a temp dir, HOME another temp dir."""

    def __init__(self, root: Path, home: Path, log: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.root, self.home, self.log = root, home, log
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.base = f"http://127.0.0.1:{self.port}"
        bin_dir = Path(sys.executable).parent
        cmd = [
            str(bin_dir / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, for the tests
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--allow-root", *extra_args,
        ]  # fmt: skip
        news = home / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text('{"fetchNews": "false"}')  # no "get notified about news?" toast over the screenshots
        env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("JUPYTER_CONFIG_DIR", None)
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_http(f"{self.base}/api/status", timeout_s=SERVER_START_TIMEOUT_S, proc=self.proc, log=log)
        except BaseException:
            self.stop()
            raise

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """Call the server's REST API with the token (or another one); returns the decoded JSON body."""
        headers = {"Content-Type": "application/json", "Authorization": f"token {self.token if token is None else token}"}
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, method=method, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
        return json.loads(text) if text else None

    def make_notebook(self, name: str, cells: list[str]) -> str:
        """Create a notebook of code cells through the contents API; returns its path relative to the root."""
        nb = {
            "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": uuid.uuid4().hex[:8], "metadata": {}, "source": source,
                       "outputs": [], "execution_count": None} for source in cells],
        }  # fmt: skip
        self.api("PUT", f"/api/contents/{name}", {"type": "notebook", "content": nb})
        return name

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}/{path.lstrip('/')}{sep}token={self.token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def is_offsite(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in LOCAL_SCHEMES:
        return False
    return parsed.hostname not in LOOPBACK_HOSTS


def shot(page: Any, name: str) -> Path:
    """Full-page screenshot kept under artifacts/browser/NAME.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_lab(page: Any, lab: LabServer, path: str = "lab") -> None:
    """Open a JupyterLab URL (`lab`, `lab/tree/x.ipynb`) with a reset workspace; wait until every plugin activated."""
    page.goto(lab.url(f"{path}?reset"), wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=90_000)
    page.evaluate("() => window.jupyterapp.started")  # a promise: resolves when all plugins activated
    page.wait_for_selector("#jp-main-dock-panel", timeout=60_000)


def open_notebook(page: Any, lab: LabServer, name: str, *, kernel_timeout_ms: int = 120_000) -> None:
    """Open a notebook in lab and wait for its kernel to be idle."""
    open_lab(page, lab, f"lab/tree/{name}")
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                   return k && k.status === 'idle'; }""",
        timeout=kernel_timeout_ms,
    )


def run_all_cells(page: Any, *, timeout_ms: int = 240_000) -> list[str]:
    """Run every cell of the current notebook, wait until all ran, and return the error outputs' texts (empty = ok)."""
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   if (!w || !w.content || !w.content.model) return false;
                   const cells = w.content.model.cells;
                   for (let i = 0; i < cells.length; i++) {
                     const c = cells.get(i);
                     if (c.type === 'code' && c.sharedModel.getSource().trim() && c.executionCount == null) return false;
                   }
                   const k = w.sessionContext.session && w.sessionContext.session.kernel;
                   return k && k.status === 'idle'; }""",
        timeout=timeout_ms,
        polling=250,
    )
    return notebook_errors(page)


def notebook_errors(page: Any) -> list[str]:
    """Texts of the error outputs (tracebacks) in the current notebook's model."""
    result: list[str] = page.evaluate(
        """() => { const w = window.jupyterapp.shell.currentWidget; const errs = [];
                   const cells = w.content.model.cells;
                   for (let i = 0; i < cells.length; i++) {
                     const c = cells.get(i);
                     if (c.type !== 'code') continue;
                     for (let j = 0; j < c.outputs.length; j++) {
                       const o = c.outputs.get(j).toJSON();
                       if (o.output_type === 'error') errs.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
                     }
                   }
                   return errs; }"""
    )
    return result


