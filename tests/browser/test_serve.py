"""`workbench serve`: the dashboard as a standalone Panel app on loopback, in headless Chromium. Every view renders,
moving a control changes the page, and no request leaves the machine (the `page` fixture checks every URL).
Screenshots: artifacts/browser/serve-*.png."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.harness import is_offsite, served_app, shot
from workbench.loader import load_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_app(tmp_path_factory.mktemp("serve") / "serve.log", "--prompt", "def add(a, b):\n    return a + b\n") as url:
        yield url


def _tab(page: Any, title: str) -> None:
    page.locator(".bk-tab", has_text=title).first.click()


def test_served_dashboard_renders_and_reacts(served: str, page: Any) -> None:
    page.goto(served, wait_until="load")
    caption = page.locator(".wb-routing-caption").first
    caption.wait_for(timeout=60_000)
    # whatever model "default" is: the caption states its shape, checked for consistency here
    m = re.match(r"live: tokens 0-(\d+) of (\d+) \(page 1/1\) x (\d+) MoE layers, top-(\d+) of (\d+) experts",
                 caption.inner_text())
    assert m, caption.inner_text()
    last, S, L, k, E = map(int, m.groups())
    assert last == S - 1 and S > 10 and L >= 1 and 1 <= k <= E
    painted = page.locator("canvas.wb-routing-grid").first.evaluate("""(c) => { const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
        return n; }""")
    assert painted > 1000
    # the token texts are on the axis, whitespace made visible (the prompt has spaces and newlines)
    labels = page.locator(".wb-routing-tokens li").evaluate_all("els => els.map(e => e.textContent)")
    assert len(labels) == S and "\u21b5" in "".join(labels) and "\u00b7" in "".join(labels)
    geo = page.locator("canvas.wb-routing-grid").first.evaluate("c => ({...c.dataset})")
    box = page.locator("canvas.wb-routing-grid").first.bounding_box()
    page.mouse.click(box["x"] + float(geo["gridX"]) + 2.5 * float(geo["cellW"]),
                     box["y"] + float(geo["gridY"]) + 0.5 * float(geo["cellH"]))
    assert page.locator(".wb-routing-detail-table tr[data-layer]").count() == L
    served_cfg = load_model("default").model.config  # the model `workbench serve` loaded
    hashed = [layer for layer in served_cfg.moe_layers if served_cfg.is_hash_layer(layer)]
    for layer in served_cfg.moe_layers:  # V4's hash-routed rows are marked in the served grid too
        row = page.locator(f'.wb-routing-detail-table tr[data-layer="{layer}"]').first
        assert row.get_attribute("data-hash-routed") == str(layer in hashed).lower()
        assert (row.text_content() or "").startswith(("#" if layer in hashed else "") + f"L{layer}")
    assert page.locator('.wb-routing-tokens li[aria-current="true"]').first.get_attribute("data-token") == "2"
    page.locator(".wb-routing-legend-item").first.hover()  # off the grid: the tooltip no longer hides the labels
    shot(page, "serve-routing")

    _tab(page, "Specialisation")
    page.locator(".wb-spec").first.wait_for()
    assert re.search(r"layer \d+, expert \d+: chosen [1-9]\d* times", page.locator(".wb-spec").first.inner_text())
    _tab(page, "KV compression")
    page.locator(".wb-kv-row").first.wait_for()
    assert page.locator(".wb-kv-row").count() == 7
    if served_cfg.is_v4:  # the live truncation of sparse attention, through the Panel mirror
        assert page.locator(".wb-kv-sparse-result").count() == 1
    _tab(page, "FP8 error")
    page.locator(".wb-fp8-heat-cell").first.wait_for()
    assert page.locator(".wb-fp8-flip").count() == L
    shot(page, "serve-fp8")

    _tab(page, "Live tuner")
    report = page.locator(".wb-tuner-report").first
    report.wait_for()
    assert report.get_attribute("data-generation") == "0"
    slider = page.locator(".bk-input-group", has=page.locator(".bk-slider-title", has_text="top-k"))
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowLeft")
    page.wait_for_function("""() => { const find = (root) => { const r = root.querySelector('.wb-tuner-report');
        if (r) return r; for (const el of root.querySelectorAll('*')) if (el.shadowRoot) { const f = find(el.shadowRoot);
        if (f) return f; } return null; }; const r = find(document); return r && r.dataset.generation !== '0'; }""",
                           timeout=30_000)
    controls = json.loads(page.locator(".wb-tuner-report").first.get_attribute("data-controls"))
    assert controls == {"latent": {}, "routing": {"all": {"top_k": k - 1}}}
    shot(page, "serve-tuner")
    _tab(page, "Routing")
    cfg = served_cfg
    if not hashed:
        page.locator(".wb-routing-caption", has_text=f"top-{k - 1} of {E}").first.wait_for(timeout=30_000)
    else:  # V4's hash layers keep their k table experts (the caption's top-k): the learned layers' rows shrink
        last_layer = cfg.moe_layers[-1]
        for token in range(S):  # the grid redraws when the run's routing arrives; each click pins a fresh token
            page.mouse.click(box["x"] + float(geo["gridX"]) + (token + 0.5) * float(geo["cellW"]),
                             box["y"] + float(geo["gridY"]) + 0.5 * float(geo["cellH"]))
            row = page.locator(f'.wb-routing-detail-table tr[data-layer="{last_layer}"]').first
            if len(re.findall(r"e\d+", row.inner_text())) == k - 1:
                break
            page.wait_for_timeout(500)
        assert len(re.findall(r"e\d+", row.inner_text())) == k - 1, row.inner_text()
        # the V4 tabs: the mHC heat maps (4 x 4 per layer, site and mean / token), served through the mirror
        _tab(page, "mHC")
        page.locator(".wb-hc-cell").first.wait_for(timeout=30_000)
        cells = page.locator('.wb-hc-cell[data-which="mean"]').evaluate_all("els => els.map(e => +e.dataset.value)")
        assert len(cells) % 16 == 0 and len(cells) >= 2 * 16 and all(0 <= v <= 1 for v in cells)
        shot(page, "serve-mhc")


_REPORT = """() => { const find = (root) => { const r = root.querySelector('.wb-tuner-report'); if (r) return r;
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) { const f = find(el.shadowRoot); if (f) return f; }
    return null; }; const r = find(document); return r ? {...r.dataset} : null; }"""


def _open_tuner(page: Any, url: str) -> tuple[int, int]:
    """Load the app, read k and E off the routing caption, switch to the tuner; returns (k, E)."""
    page.goto(url, wait_until="load")
    caption = page.locator(".wb-routing-caption").first
    caption.wait_for(timeout=60_000)
    k, E = map(int, re.search(r"top-(\d+) of (\d+) experts", caption.inner_text()).groups())
    _tab(page, "Live tuner")
    page.locator(".wb-tuner-report").first.wait_for(timeout=60_000)
    return k, E


def test_each_browser_tab_gets_its_own_dashboard(served: str, page: Any, browser: Any) -> None:
    """One visitor's slider must not move another's page: every tab gets a fresh dashboard on the shared model."""
    k, E = _open_tuner(page, served)
    assert page.evaluate(_REPORT)["generation"] == "0"  # a fresh session, whatever earlier tabs did
    handle = page.locator(".bk-input-group", has=page.locator(".bk-slider-title", has_text="top-k")) \
        .locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowLeft")
    page.wait_for_function(f"() => {{ const d = ({_REPORT})(); return d && d.generation !== '0'; }}", timeout=30_000)
    assert json.loads(page.evaluate(_REPORT)["controls"])["routing"] == {"all": {"top_k": k - 1}}

    other_context = browser.new_context(viewport={"width": 1440, "height": 900})
    requested: list[str] = []
    try:
        other = other_context.new_page()
        other.on("request", lambda r: requested.append(r.url))
        assert _open_tuner(other, served) == (k, E)  # the second tab's routing is the unchanged model's
        report = other.evaluate(_REPORT)
        assert report["generation"] == "0" and json.loads(report["controls"]) == {"latent": {}, "routing": {}}
        _tab(other, "Routing")
        other.locator(".wb-routing-caption", has_text=f"top-{k} of {E}").first.wait_for(timeout=30_000)
        shot(other, "serve-second-tab")
    finally:
        other_context.close()
    assert [u for u in requested if is_offsite(u)] == []
    assert json.loads(page.evaluate(_REPORT)["controls"])["routing"] == {"all": {"top_k": k - 1}}  # tab 1 kept its own
