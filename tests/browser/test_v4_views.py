"""The V4 views in a real JupyterLab, in headless Chromium, on the random tiny V4 model: the mHC heat maps show the
kernel's matrices, moving the KV view's index_topk slider changes its KL line to the kernel's own full run, the
routing grid marks the hash-routed rows (label, border, tooltip), and the static exports render alone.
Screenshots: artifacts/browser/v4-*.png."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.browser.harness import LabServer, open_notebook, run_all_cells, shot

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2 + "def f(x): return x * 2"  # 113 tokens with BOS
CELLS = [
    "import json\nfrom workbench.controls import Controls\nfrom workbench.widgets import KVCompression, RoutingExplorer\n"
    "from workbench.widgets.hyper_connections import HyperConnections\n"
    f"PROMPT = {PROMPT!r}\n"
    "hc = HyperConnections(model='tiny-v4-random', prompt=PROMPT)\n"
    "kv = KVCompression(model='tiny-v4-random', prompt=PROMPT)\n"
    "rx = RoutingExplorer(model='tiny-v4-random', prompt=PROMPT)\n"
    "cfg = rx.live.config\nstats = hc.statistics()\n"
    "print('FACTS', json.dumps({'hash': [l for l in cfg.moe_layers if cfg.is_hash_layer(l)],\n"
    "    'layers': list(cfg.moe_layers), 'topk': cfg.index_topk,\n"
    "    'mean': stats['mean_matrix'].values.tolist(),\n"
    "    'dist': stats['dist_identity'].values.tolist(),\n"
    "    'kl': kv.live.session.full_run(Controls.index_topk(cfg.index_topk - 1)).kl,\n"
    "    'token_ids': rx.live.input_ids[0].tolist()}))",
    "hc",
    "kv",
    "rx",
    "for name, v in (('hc', hc), ('kv', kv), ('rx', rx)):\n    v.save_html(f'v4-{name}.html')\nprint('exported')",
]
HASH_INK = (138, 75, 0)  # routing_grid.js: the border of a hash-routed row (no expert colour has a 0 channel)


def _facts(page: Any) -> dict[str, Any]:
    out = page.locator(".jp-OutputArea-output", has_text="FACTS").first.inner_text()
    return dict(json.loads(out.split("FACTS", 1)[1]))


def _cells(page: Any) -> dict[tuple[int, str, int, int], float]:
    got = page.locator('.wb-hc-cell[data-which="mean"]').evaluate_all(
        "els => els.map(e => [Number(e.dataset.layer), e.dataset.site, Number(e.dataset.in), Number(e.dataset.out),"
        " Number(e.dataset.value)])")
    return {(layer, site, i, j): v for layer, site, i, j, v in got}


def _check_heat_maps(page: Any, facts: dict[str, Any]) -> None:
    page.locator(".wb-hc-cell").first.wait_for(timeout=60_000)
    page.locator(".wb-hc").first.scroll_into_view_if_needed()
    cells = _cells(page)
    for layer, sites in enumerate(facts["mean"]):
        for s, site in enumerate(("hc_attn", "hc_ffn")):
            for i, row in enumerate(sites[s]):
                for j, v in enumerate(row):
                    assert cells[layer, site, i, j] == pytest.approx(v, abs=1e-7)
    label = page.locator('.wb-hc-cell[data-layer="0"][data-site="hc_attn"][data-which="mean"]').first
    assert re.fullmatch(r"\d\.\d\d", (label.text_content() or "").strip())  # each cell is labelled with its value
    dist = page.locator('.wb-hc-stats[data-layer="2"][data-site="hc_ffn"]').first.get_attribute("data-dist-identity")
    assert float(dist) == pytest.approx(facts["dist"][2][1], rel=1e-6)


def _ink_pixels(page: Any, row: int) -> int:
    """Pixels of HASH_INK along the top edge of routing-grid row `row` (where the dashed border runs)."""
    return int(page.locator("canvas.wb-routing-grid").first.evaluate("""(c, [row, ink]) => {
        const s = c.width / c.clientWidth, g = c.getContext('2d'), ds = c.dataset;
        const x = Number(ds.gridX), y = Number(ds.gridY) + row * Number(ds.cellH), w = c.clientWidth - x - 8;
        const d = g.getImageData(Math.round(x * s), Math.round(y * s), Math.round(w * s), Math.round(3 * s)).data;
        let n = 0; for (let i = 0; i < d.length; i += 4)
          if (Math.abs(d[i] - ink[0]) < 12 && Math.abs(d[i + 1] - ink[1]) < 12 && d[i + 2] < 24 && d[i + 3] > 200) n++;
        return n; }""", [row, list(HASH_INK)]))


def _check_hash_marks(page: Any, facts: dict[str, Any]) -> None:
    root = page.locator(".wb-routing").first
    root.wait_for(timeout=60_000)
    root.scroll_into_view_if_needed()
    assert root.get_attribute("data-hash-layers") == ",".join(map(str, facts["hash"])) == "0"
    rows = page.locator(".wb-routing-rows li").evaluate_all(
        "els => els.map(e => [Number(e.dataset.layer), e.dataset.hashRouted, e.dataset.label])")
    assert rows == [[layer, str(layer in facts["hash"]).lower(), ("#" if layer in facts["hash"] else "") + f"L{layer}"]
                    for layer in facts["layers"]]
    assert "# = hash-routed (L0: experts = tid2eid[token id])" in page.locator(".wb-routing-caption").first.text_content()
    assert _ink_pixels(page, 0) > 50 and _ink_pixels(page, 1) == 0  # the dashed border on the hash row only
    canvas = page.locator("canvas.wb-routing-grid").first
    canvas.scroll_into_view_if_needed()  # the cursor must be over the grid on screen, not where it was
    ds = canvas.evaluate("c => ({...c.dataset})")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + float(ds["gridX"]) + 5.5 * float(ds["cellW"]),
                    box["y"] + float(ds["gridY"]) + 0.5 * float(ds["cellH"]))
    page.wait_for_function("""() => { const t = document.querySelector('.wb-routing-tip');
        return t && t.offsetParent !== null && t.innerText.includes('tid2eid'); }""", timeout=30_000)
    tip = page.locator(".wb-routing-tip").first.inner_text()
    tid = facts["token_ids"][5]
    assert re.search(rf"^#L0: e\d+ .*\(hash-routed: experts = tid2eid\[{tid}\]\)$", tip, re.M), tip
    assert re.search(r"^L1: e\d+ [^(]*$", tip, re.M), tip  # a gated row says nothing of tid2eid
    page.mouse.click(box["x"] + float(ds["gridX"]) + 5.5 * float(ds["cellW"]),
                     box["y"] + float(ds["gridY"]) + 0.5 * float(ds["cellH"]))
    detail = page.locator('.wb-routing-detail-table tr[data-layer="0"]').first
    assert detail.get_attribute("data-hash-routed") == "true" and (detail.text_content() or "").startswith("#L0")


def test_v4_views_render_react_and_export(lab: LabServer, page: Any) -> None:
    name = lab.make_notebook("v4.ipynb", CELLS)
    open_notebook(page, lab, name)
    assert run_all_cells(page) == []
    facts = _facts(page)
    _check_heat_maps(page, facts)
    shot(page, "v4-notebook")
    _check_hash_marks(page, facts)
    shot(page, "v4-routing")

    # the KV view: move index_topk down by one; the KL line becomes the kernel's full run at that budget
    result = page.locator(".wb-kv-sparse-result").first
    result.scroll_into_view_if_needed()
    assert result.get_attribute("data-generation") == "0" and float(result.get_attribute("data-kl")) == 0
    handle = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile("^index_topk$"))) \
        .locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowLeft")
    page.wait_for_function("""() => { const r = document.querySelector('.wb-kv-sparse-result');
        return r && r.dataset.generation !== '0'; }""", timeout=60_000)
    result = page.locator(".wb-kv-sparse-result").first
    assert float(result.get_attribute("data-kl")) == pytest.approx(facts["kl"], abs=1e-6) and facts["kl"] > 0
    k = facts["topk"] - 1
    assert json.loads(result.get_attribute("data-attention")) == {"1": {"index_topk": k}, "3": {"index_topk": k}}
    assert 0 < float(result.get_attribute("data-selection-change")) < 1
    assert f"index_topk {k} of {facts['topk']}" in (result.text_content() or "")
    shot(page, "v4-kv")

    # the static exports, opened alone: the cells, the KV line and the marked grid are all there
    page.goto(lab.url("files/v4-hc.html"), wait_until="load")
    _check_heat_maps(page, facts)
    shot(page, "v4-export-hc")
    page.goto(lab.url("files/v4-kv.html"), wait_until="load")
    assert page.locator(".wb-kv-sparse-result").first.get_attribute("data-kl") == "0"
    assert "no MLA latent" in (page.locator(".wb-kv-no-latent").first.text_content() or "")
    page.goto(lab.url("files/v4-rx.html"), wait_until="load")
    _check_hash_marks(page, facts)
    shot(page, "v4-export-routing")
