"""The sparse-attention view in headless Chromium: alone and in the dashboard in a real JupyterLab, in its static
export opened from file:// (no kernel), and under `workbench serve`. What the page highlights (window tokens, chosen
entries, mass bars) must equal what the kernel's `SparseAttention.reads` prints for the same query and layer, for a
hovered query, a clicked one and another layer. Screenshots: artifacts/browser/sparse-*.png."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.harness import LabServer, open_notebook, run_all_cells, served_app, shot

# 104 tokens with BOS: tiny-v4's CSA layers see up to 26 entries and keep 16, so late queries are sparse
PROMPT = "def add(a, b):\n    return a + b\n\nThe indexer keeps sixteen compressed blocks per query, sparse at last."
HOVERED = 40
FACTS = f"""import json
def facts(view):
    n = view.data['n']
    return json.dumps({{'n': n, 'text': view.data['text'],
                       'entries': {{str(L['layer']): L['n_entries'] for L in view.data['layers']}},
                       'reads': {{f'{{L}}/{{q}}': view.reads(L, q) for L in range(4) for q in ({HOVERED}, n - 1)}}}})
"""
ALONE = [FACTS + "from workbench.widgets import SparseAttention\n"
         f"sa = SparseAttention(model='tiny-v4-random', prompt={PROMPT!r})\nprint('FACTS', facts(sa))",
         "sa", "sa.save_html('sparse-export.html')\nprint('exported')"]
DASHBOARD = [FACTS + "from workbench.widgets import Workbench\n"
             f"wb = Workbench('tiny-v4-random', prompt={PROMPT!r}, background=False)\nprint('FACTS', facts(wb.sparse_attention))",
             "wb"]


def _facts(page: Any) -> dict[str, Any]:
    out = page.locator(".jp-OutputArea-output", has_text="FACTS").first.inner_text()
    return dict(json.loads(out.split("FACTS", 1)[1]))


def _shown(page: Any) -> dict[str, Any]:
    """What the map highlights now, read off its elements' data attributes."""
    return dict(page.locator(".wb-sa").first.evaluate("""(root) => {
        const all = (sel) => [...root.querySelectorAll(sel)];
        const d = root.querySelector('.wb-sa-detail').dataset;
        const byState = (s) => all(`.wb-sa-entry[data-state="${s}"]`).map((g) => Number(g.dataset.entry));
        const tokens = (s) => all(`rect.wb-sa-token[data-read="${s}"]`).map((r) => Number(r.dataset.token));
        const mean = all('.wb-sa-mass-row[data-head="mean"] .wb-sa-mass-seg').map((s) => Number(s.dataset.value));
        const spans = all('.wb-sa-entry[data-state="chosen"]').map((g) =>
          [Number(g.dataset.lo), Number(g.dataset.ownLo), Number(g.dataset.hi)]);
        const pressed = all('.wb-sa-layer-button[aria-pressed="true"]').map((b) => Number(b.dataset.layer));
        return {layer: Number(root.dataset.layer), query: Number(root.dataset.query), hover: root.dataset.hoverQuery,
                detail_query: Number(d.query), chosen: d.chosen ? d.chosen.split(',').map(Number) : [],
                window: d.windowLo === '' ? null : [Number(d.windowLo), Number(d.windowHi)], visible: Number(d.visible),
                chosen_entries: byState('chosen'), unchosen: byState('unchosen'), future: byState('future'),
                window_tokens: tokens('window'), query_token: tokens('query'), mass_mean: mean, spans, pressed};
    }"""))


def _check(shown: dict[str, Any], want: dict[str, Any], n_entries: int) -> None:
    """The map's highlights against `SparseAttention.reads` for the same layer and query."""
    t = want["query"]
    assert shown["layer"] == want["layer"] and shown["detail_query"] == t and shown["pressed"] == [want["layer"]]
    assert shown["chosen"] == want["chosen"] and shown["visible"] == want["visible"]
    assert sorted(shown["chosen_entries"]) == sorted(want["chosen"])
    assert sorted(shown["chosen_entries"] + shown["unchosen"]) == list(range(want["visible"]))
    assert shown["future"] == list(range(want["visible"], n_entries))
    assert sorted(map(tuple, shown["spans"])) == sorted(map(tuple, want["spans"]))
    assert shown["window"] == want["window"] and shown["query_token"] == [t]
    lo, hi = want["window"]
    assert shown["window_tokens"] == [i for i in range(lo, hi + 1) if i != t]
    assert shown["mass_mean"] == pytest.approx(want["mass_mean"], abs=1e-6)


def _token(page: Any, i: int) -> Any:
    return page.locator(f'rect.wb-sa-token[data-token="{i}"]').first


def _layer_button(page: Any, layer: int) -> Any:
    return page.locator(f'.wb-sa-layer-button[data-layer="{layer}"]').first


def _exercise(page: Any, facts: dict[str, Any], prefix: str) -> None:
    """Default view (last query, first CSA layer), hover a token, click it, switch to the HCA layer."""
    n, reads, entries = facts["n"], facts["reads"], facts["entries"]
    page.locator(".wb-sa-detail").first.wait_for(timeout=60_000)
    shown = _shown(page)
    assert shown["query"] == n - 1 and shown["hover"] == ""
    _check(shown, reads[f"1/{n - 1}"], entries["1"])
    assert len(shown["chosen"]) == 16 < shown["visible"]  # sparse: the indexer dropped entries
    assert page.locator(".wb-sa-legend-score").count() == 1
    page.locator(".wb-sa").first.scroll_into_view_if_needed()
    shot(page, f"{prefix}-csa")

    _token(page, HOVERED).hover()  # preview: the hovered token is the query, the selection stays
    shown = _shown(page)
    assert shown["hover"] == str(HOVERED) and shown["query"] == n - 1
    _check(shown, reads[f"1/{HOVERED}"], entries["1"])
    _token(page, HOVERED).click()
    page.locator(f'.wb-sa[data-query="{HOVERED}"]').first.wait_for(timeout=10_000)
    _layer_button(page, 2).click()
    page.locator('.wb-sa[data-layer="2"]').first.wait_for(timeout=10_000)
    shown = _shown(page)
    _check(shown, reads[f"2/{HOVERED}"], entries["2"])
    assert shown["chosen"] == list(range((HOVERED + 1) // 16))  # HCA: every complete entry
    _layer_button(page, 0).click()
    page.locator('.wb-sa[data-layer="0"]').first.wait_for(timeout=10_000)
    shown = _shown(page)
    assert shown["chosen_entries"] == [] and shown["window"] == reads[f"0/{HOVERED}"]["window"]
    assert shown["mass_mean"] == pytest.approx(reads[f"0/{HOVERED}"]["mass_mean"], abs=1e-6)
    assert shown["mass_mean"][1] == 0  # a window-only layer has no compressed mass
    _layer_button(page, 2).click()
    page.locator('.wb-sa[data-layer="2"]').first.wait_for(timeout=10_000)
    shot(page, f"{prefix}-hca")


def _kernel_run(page: Any, code: str) -> None:
    page.evaluate("""(code) => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
        .requestExecute({code}).done""", code)


def test_view_alone_and_its_static_export(lab: LabServer, page: Any, browser: Any) -> None:
    name = lab.make_notebook("sparse.ipynb", ALONE)
    open_notebook(page, lab, name)
    assert run_all_cells(page) == []
    facts = _facts(page)
    assert facts["n"] == len(PROMPT) + 1
    _exercise(page, facts, "sparse-notebook")
    # the click and the layer button reached the kernel: the ipywidgets controls show them
    readouts = page.locator(".widget-readout").evaluate_all("els => els.map(e => e.textContent.trim())")
    assert str(HOVERED) in readouts
    picked = page.locator(".widget-dropdown select").first.evaluate("s => s.options[s.selectedIndex].text")
    assert picked.replace("\xa0", " ") == "L2 HCA"  # ipywidgets shows option spaces as no-break spaces

    # the export (written before any click) on its own: file://, no server, no kernel
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    requested: list[str] = []
    try:
        alone = context.new_page()
        alone.on("request", lambda r: requested.append(r.url))
        alone.goto((lab.root / "sparse-export.html").as_uri(), wait_until="load")
        _exercise(alone, facts, "sparse-export")
    finally:
        context.close()
    assert requested and all(u.startswith("file://") for u in requested), requested


def test_dashboard_tab_follows_the_session(lab: LabServer, page: Any) -> None:
    name = lab.make_notebook("sparse-dashboard.ipynb", DASHBOARD)
    open_notebook(page, lab, name)
    assert run_all_cells(page) == []
    facts = _facts(page)
    page.locator(".widget-tab .lm-TabBar-tab", has_text="Sparse attention").first.click()
    _exercise(page, facts, "sparse-dashboard")
    # another view's control (here from the kernel) redraws the map: 4 picks per query
    _kernel_run(page, "from workbench.controls import AttentionControl\n"
                      "wb.live.update(attention={'all': AttentionControl(index_topk=4)})")
    _layer_button(page, 1).click()
    page.wait_for_function("""() => { const d = document.querySelector('.wb-sa-detail');
        return d && d.dataset.layer === '1' && d.dataset.chosen.split(',').length === 4; }""", timeout=30_000)
    assert _shown(page)["chosen"] == facts["reads"][f"1/{HOVERED}"]["chosen"][:4]  # the best 4 of the 16
    assert "index_topk=4" in page.locator(".wb-sa-status").first.inner_text()
    shot(page, "sparse-dashboard-topk4")


@pytest.fixture(scope="module")
def served_v4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_app(tmp_path_factory.mktemp("serve-v4") / "serve.log", "--model", "tiny-v4-random", "--prompt",
                    PROMPT) as url:
        yield url


def test_served_sparse_attention(served_v4: str, page: Any) -> None:
    from workbench.widgets import SparseAttention

    view = SparseAttention(model="tiny-v4-random", prompt=PROMPT)  # the same seeded model, computed here
    n = view.data["n"]
    facts = {"n": n, "entries": {str(L["layer"]): L["n_entries"] for L in view.data["layers"]},
             "reads": {f"{L}/{q}": view.reads(L, q) for L in range(4) for q in (HOVERED, n - 1)}}
    page.goto(served_v4, wait_until="load")
    page.locator(".wb-routing-caption").first.wait_for(timeout=60_000)
    page.locator(".bk-tab", has_text="Sparse attention").first.click()
    _exercise(page, facts, "sparse-serve")
    # the browser's layer button moved the Python layer picker too
    select = page.locator(".bk-input-group", has=page.locator("label", has_text="layer")).locator("select").last
    for _ in range(100):  # the change goes to the server and back: poll (the select lives in Bokeh's shadow DOM)
        if select.evaluate("s => s.options[s.selectedIndex].text") == "L2 HCA":
            break
        page.wait_for_timeout(100)
    assert select.evaluate("s => s.options[s.selectedIndex].text") == "L2 HCA"
    shot(page, "sparse-serve-picker")
