"""The harness itself: a notebook runs in a real lab, errors are reported, off-machine requests are recognised."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.harness import LabServer, is_offsite, open_notebook, run_all_cells, shot


def test_offsite_urls_are_recognised() -> None:
    assert is_offsite("https://cdn.jsdelivr.net/npm/x.js")
    assert is_offsite("http://unpkg.com/y")
    assert not is_offsite("http://127.0.0.1:8888/lab")
    assert not is_offsite("http://localhost:1/static/x.js")
    assert not is_offsite("data:image/png;base64,AAAA")
    assert not is_offsite("blob:http://127.0.0.1:8888/uuid")


def test_token_is_required(lab: LabServer) -> None:
    import urllib.error

    assert lab.api("GET", "/api/status")["started"]
    with pytest.raises(urllib.error.HTTPError) as e:
        lab.api("GET", "/api/contents", token="wrong")
    assert e.value.code == 403


def test_notebook_runs_and_errors_are_reported(lab: LabServer, page: Any) -> None:
    name = lab.make_notebook("harness.ipynb", ["x = 6 * 7\nprint(x)", "raise ValueError('on purpose')"])
    open_notebook(page, lab, name)
    errors = run_all_cells(page)
    assert errors == ["cell 1: ValueError: on purpose"]
    assert page.locator(".jp-OutputArea-output").first.inner_text().strip() == "42"
    shot(page, "harness-notebook")
