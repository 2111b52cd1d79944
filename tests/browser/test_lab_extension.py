"""The lab extension in a live JupyterLab: the sidebar lists real stores, its actions open notebooks that run,
the launcher card and palette entries exist. Every page also fails its test if it made a request off loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

from tests.browser.harness import LabServer, open_lab, run_all_cells, shot

pytestmark = pytest.mark.browser

SIDEBAR = "#moe-workbench-sidebar"
CORPUS = "def f(x):\n    return x + 1\nthe expert routes a token to a few of its sixteen experts\n"


@pytest.fixture(scope="module")
def stores(lab: LabServer) -> LabServer:
    """`corpus.zarr` written by the real `workbench trace` command, a copy in a sub-folder, and a corrupt store."""
    (lab.root / "in.txt").write_text(CORPUS)
    command = [str(Path(sys.executable).parent / "workbench"), "trace", "--input", str(lab.root / "in.txt"),
               "--out", str(lab.root / "corpus.zarr")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    (lab.root / "runs").mkdir()
    shutil.copytree(lab.root / "corpus.zarr", lab.root / "runs" / "second.zarr")
    (lab.root / "broken.zarr").mkdir()
    (lab.root / "broken.zarr" / "zarr.json").write_text("{ not json")
    return lab


def open_sidebar(page: Any, lab: LabServer) -> Any:
    """Open lab and click the sidebar's tab, as a user would; returns the sidebar once its listing has loaded."""
    open_lab(page, lab)
    page.click('.jp-SideBar [data-id="moe-workbench-sidebar"]')
    sidebar = page.locator(SIDEBAR)
    sidebar.locator(".wbl-store").first.wait_for(timeout=60_000)
    return sidebar


def test_sidebar_lists_the_stores_with_their_load_picture(stores: LabServer, page: Any) -> None:
    sidebar = open_sidebar(page, stores)
    assert sidebar.locator(".wbl-title").inner_text() == "MoE Workbench"
    assert sidebar.locator(".wbl-store").evaluate_all("items => items.map(i => i.dataset.path)") == [
        "corpus.zarr", "runs/second.zarr"]
    listing = stores.api("GET", "/workbench/api/traces")
    entry = listing["stores"][0]
    item = sidebar.locator('.wbl-store[data-path="corpus.zarr"]')
    assert item.locator(".wbl-store-name").inner_text() == "corpus.zarr"
    meta = item.locator(".wbl-store-meta").inner_text()
    stored = xr.open_zarr(stores.root / "corpus.zarr", consolidated=False)  # what the store itself says
    config = json.loads(stored.attrs["model_config"])
    layers, experts, moe_layers = config["num_hidden_layers"], config["n_routed_experts"], stored.sizes["layer"]
    assert entry["tokens"] == stored.sizes["token"]
    assert meta == f"{entry['model']} · {entry['tokens']} tokens · {layers} layers · {experts} experts"
    assert item.locator(".wbl-badge").inner_text() == "complete"
    assert item.locator(".wbl-store-created").inner_text().startswith("created ")
    assert "broken.zarr" in sidebar.locator(".wbl-store-error").inner_text()  # reported, not fatal

    # the picture: one rect per (MoE layer, expert), showing the summary's relative loads
    item.locator("svg.wbl-load-picture rect").first.wait_for(timeout=60_000)
    drawn = item.locator("svg.wbl-load-picture rect").evaluate_all("rs => rs.map(r => Number(r.dataset.load))")
    summary = stores.api("GET", "/workbench/api/traces/summary?path=corpus.zarr")
    assert drawn == [v for row in summary["load_picture"]["cells"] for v in row]
    assert len(drawn) == moe_layers * experts
    fills = set(item.locator("svg.wbl-load-picture rect").evaluate_all("rs => rs.map(r => r.getAttribute('fill'))"))
    assert len(fills) > 1  # an unbalanced router on 53 tokens is not one colour
    title = item.locator("svg.wbl-load-picture rect title").first.text_content()
    first_moe = int(stored["layer"].values[0])  # the default (V4-style) model routes in every layer, V3 from 1
    assert title.startswith(f"layer {first_moe}, expert 0: ") and title.endswith("x uniform load")
    shot(page, "lab-extension-sidebar")


def test_filter_and_refresh(stores: LabServer, page: Any) -> None:
    sidebar = open_sidebar(page, stores)
    visible = ".wbl-store:not([hidden])"
    sidebar.locator(".wbl-filter").fill("second")
    assert sidebar.locator(visible).evaluate_all("items => items.map(i => i.dataset.path)") == ["runs/second.zarr"]
    assert sidebar.locator(".wbl-status").inner_text() == "1 of 2 trace stores match “second”"
    sidebar.locator(".wbl-filter").fill("no such store")
    assert sidebar.locator(visible).count() == 0
    sidebar.locator(".wbl-filter").fill("")
    assert sidebar.locator(visible).count() == 2

    shutil.copytree(stores.root / "corpus.zarr", stores.root / "runs" / "third.zarr")
    try:
        sidebar.locator(".wbl-refresh").click()
        sidebar.locator('.wbl-store[data-path="runs/third.zarr"]').wait_for(timeout=30_000)
        assert sidebar.locator(".wbl-status").inner_text() == "3 trace stores"
    finally:
        shutil.rmtree(stores.root / "runs" / "third.zarr")


def test_open_analysis_notebook_opens_a_notebook_that_runs(stores: LabServer, page: Any) -> None:
    sidebar = open_sidebar(page, stores)
    sidebar.locator('.wbl-store[data-path="corpus.zarr"] .wbl-open-analysis').click()
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   return w && w.context && w.context.path === 'corpus-analysis.ipynb'; }""", timeout=60_000)
    assert (stores.root / "corpus-analysis.ipynb").is_file()
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   const k = w.sessionContext.session && w.sessionContext.session.kernel;
                   return k && k.status === 'idle'; }""", timeout=120_000)
    assert run_all_cells(page) == []
    outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
    assert outputs.count() >= 6  # the dataset repr, load balance, top tokens, co-activation, two views
    assert "expert_ids" in outputs.first.inner_text()
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .wb-routing-grid").first.wait_for(timeout=60_000)
    shot(page, "lab-extension-analysis-notebook")


def test_open_in_workbench_creates_the_dashboard_notebook(stores: LabServer, page: Any) -> None:
    sidebar = open_sidebar(page, stores)
    sidebar.locator('.wbl-store[data-path="runs/second.zarr"] .wbl-open-workbench').click()
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   return w && w.context && w.context.path === 'runs/second-workbench.ipynb'; }""", timeout=60_000)
    sources = page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   if (!w.context.isReady) return null;
                   const cells = w.content.model.cells, code = [];
                   for (let i = 0; i < cells.length; i++) {
                     if (cells.get(i).type === 'code') code.push(cells.get(i).sharedModel.getSource());
                   }
                   return code; }""", timeout=60_000).json_value()
    assert sources == ["from workbench.widgets import Workbench\n\nWorkbench(trace='second.zarr')"]
    page.wait_for_function(
        """() => { const k = window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel;
                   return k && k.status === 'idle'; }""", timeout=120_000)
    assert run_all_cells(page) == []
    header = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .wb-header")
    header.wait_for(timeout=60_000)  # the dashboard rendered, on this store
    tokens = stores.api("GET", "/workbench/api/traces/summary?path=runs/second.zarr")["tokens"]
    assert f"trace: {tokens} tokens" in header.inner_text()
    shot(page, "lab-extension-workbench-notebook")


def test_launcher_card_and_palette_create_a_live_workbench(stores: LabServer, page: Any) -> None:
    open_lab(page, stores)
    card = page.locator('.jp-LauncherCard[data-category="MoE Workbench"]', has_text="Live workbench")
    card.wait_for(timeout=60_000)
    shot(page, "lab-extension-launcher")
    card.click()
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   return w && w.context && w.context.path === 'live-workbench.ipynb'; }""", timeout=60_000)
    assert "Workbench()" in (stores.root / "live-workbench.ipynb").read_text()

    # The new notebook starts its kernel and takes focus as it settles, which closes the modal palette: wait for
    # the kernel first, then fill the palette's own search box, reopening it if focus still took it away.
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                   return k && k.status === 'idle'; }""", timeout=120_000)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(5):
        page.evaluate("() => window.jupyterapp.commands.execute('apputils:activate-command-palette')")
        search = page.locator(".lm-CommandPalette-input").first
        try:
            search.wait_for(state="visible", timeout=30_000)
            search.fill("live workbench", timeout=5_000)
            break
        except PlaywrightTimeout:  # the palette closed under us
            if attempt == 4:
                raise
    # header and item from one DOM snapshot, so a re-render between two reads cannot miss them
    page.wait_for_function(
        """() => {
            const text = (sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent || '');
            return text('.lm-CommandPalette-header').some((t) => t.includes('MoE Workbench'))
                && text('.lm-CommandPalette-item').some((t) => t.includes('New live workbench'));
        }""", timeout=60_000)
