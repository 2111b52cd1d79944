"""Fixtures for the browser tests (the machinery lives in harness.py): `lab`, `browser`, `page`.

All tests in this folder are marked `browser`. Without Debian's /usr/bin/chromium they fail, unless
WORKBENCH_BROWSER_TESTS=0 says to skip them (CI installs chromium: `make install-browser`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import CHROMIUM, CHROMIUM_ARGS, LabServer, is_offsite, shot


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if os.environ.get("WORKBENCH_BROWSER_TESTS") == "0":
                item.add_marker(pytest.mark.skip(reason="WORKBENCH_BROWSER_TESTS=0"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """One JupyterLab per test module (it takes 6-9 s to start); tests share its root dir."""
    base = tmp_path_factory.mktemp("lab")
    root, home = base / "root", base / "home"
    root.mkdir()
    home.mkdir()
    server = LabServer(root, home, base / "jupyterlab.log")
    try:
        yield server
    finally:
        server.stop()


# module scope, not session: Playwright's sync API keeps an event loop running in this thread while it is open,
# which would break the asyncio fixtures of every later (non-browser) test module
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make install-browser`) "
                    "or set WORKBENCH_BROWSER_TESTS=0 to skip the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context + page. Fails the test at teardown if any request went off loopback.

    `page.workbench_requests` lists every URL requested; `page.workbench_console_errors` the console errors.
    """
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    requested: list[str] = []
    console_errors: list[str] = []
    pg.on("request", lambda r: requested.append(r.url))
    pg.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    pg.workbench_requests = requested
    pg.workbench_console_errors = console_errors
    try:
        yield pg
    finally:
        failed = request.node.stash.get(_failed_key, False)
        if failed:
            with contextlib.suppress(Exception):
                shot(pg, f"FAILED-{request.node.name}")
        context.close()
    offsite = sorted({u for u in requested if is_offsite(u)})
    assert not offsite, f"the page made {len(offsite)} request(s) off this machine: {offsite[:10]}"


_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        item.stash[_failed_key] = True




# pytest-jupyter (loaded for tests/server) makes an asyncio loop per test and closes it afterwards; Playwright's sync
# API runs its own loop in this thread, so these tests opt out of both autouse fixtures.
@pytest.fixture
def jp_asyncio_loop() -> None:
    return None


@pytest.fixture
def jp_server_cleanup() -> None:
    return None
