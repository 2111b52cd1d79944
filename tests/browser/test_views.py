"""The dashboard in a real JupyterLab, in headless Chromium: every view renders its content, moving a control
changes what the page shows, the static export renders on its own, a 100k-token trace is paged, and no request
leaves the machine (the `page`
fixture fails the test otherwise). Screenshots: artifacts/browser/views-*.png."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.browser.harness import LabServer, open_notebook, run_all_cells, shot

# the notebook states the facts the checks need, so the test holds for either bundled model
CELLS = [
    "import json\nfrom workbench.widgets import Workbench\n"
    "wb = Workbench({model!r}, prompt='def add(a, b):\\n    return a + b\\n')\ncfg = wb.live.config\n"
    "print('FACTS', json.dumps({{'S': wb.live.input_ids.shape[1], 'layers': list(cfg.moe_layers), "
    "'k': cfg.num_experts_per_tok, 'E': cfg.n_routed_experts, 'C': cfg.kv_lora_rank, 'v4': cfg.is_v4, "
    "'hash': [l for l in cfg.moe_layers if cfg.is_hash_layer(l)], 'text': wb.routing.grid.data['text']}}))",
    "wb",
    "wb.save_html('views-export.html')\nprint('exported')",
]


def _tab(page: Any, title: str) -> None:
    page.locator(".widget-tab .lm-TabBar-tab", has_text=title).first.click()


def _slider_handle(page: Any, label: str) -> Any:
    return page.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(f"^{label}$"))) \
        .locator(".noUi-handle").first


def _painted_pixels(page: Any, selector: str, box: tuple[float, float, float, float] | None = None) -> int:
    """Non-transparent pixels of the canvas `selector`, or of the CSS-pixel rectangle `box` (x, y, w, h) in it."""
    return int(page.locator(selector).first.evaluate("""(c, box) => { const g = c.getContext('2d');
        const s = c.width / c.clientWidth; const [x, y, w, h] = box || [0, 0, c.clientWidth, c.clientHeight];
        const d = g.getImageData(Math.round(x * s), Math.round(y * s), Math.round(w * s), Math.round(h * s)).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""", box))


def _grid_geometry(page: Any) -> dict[str, float]:
    """The grid's layout as the page states it (canvas data attributes), in CSS pixels."""
    ds = page.locator("canvas.wb-routing-grid").first.evaluate("c => ({...c.dataset})")
    return {**{k: float(ds[k]) for k in ("cellW", "cellH", "gridX", "gridY", "labelY")}, "mode": ds["labelMode"]}


def _cell_point(page: Any, token: int, layer_row: int) -> tuple[float, float]:
    """Page coordinates of the centre of cell (token column, layer row) of the first grid."""
    geo, box = _grid_geometry(page), page.locator("canvas.wb-routing-grid").first.bounding_box()
    return (box["x"] + geo["gridX"] + (token + 0.5) * geo["cellW"],
            box["y"] + geo["gridY"] + (layer_row + 0.5) * geo["cellH"])


def _cell_ink(page: Any, token: int, layer_row: int) -> int:
    """Pixels in the top part of a cell that differ from its fill colour: the expert number drawn in it, if any."""
    geo = _grid_geometry(page)
    x, y = geo["gridX"] + token * geo["cellW"] + 3, geo["gridY"] + layer_row * geo["cellH"] + 2
    return int(page.locator("canvas.wb-routing-grid").first.evaluate("""(c, [x, y, w, h]) => {
        const s = c.width / c.clientWidth, g = c.getContext('2d');
        const d = g.getImageData(Math.round(x * s), Math.round(y * s), Math.round(w * s), Math.round(h * s)).data;
        const key = (i) => `${d[i]},${d[i + 1]},${d[i + 2]}`, counts = new Map();
        for (let i = 0; i < d.length; i += 4) counts.set(key(i), (counts.get(key(i)) || 0) + 1);
        return d.length / 4 - Math.max(...counts.values()); }""",
        [x, y, geo["cellW"] - 6, geo["cellH"] * 0.5]))


# how the grid shows whitespace in token labels (the part of routing_grid.js's visibleToken a prompt exercises)
VISIBLE_WHITESPACE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5"}


def _visible(text: str) -> str:
    return "".join(VISIBLE_WHITESPACE.get(ch, ch) for ch in text) or "\u2205"


def _token_labels(page: Any) -> list[str]:
    return [str(t) for t in page.locator(".wb-routing-tokens li").evaluate_all("els => els.map(e => e.textContent)")]


@pytest.mark.parametrize("model", ["default", "default-v3"])
def test_dashboard_renders_and_reacts(lab: LabServer, page: Any, model: str) -> None:
    name = lab.make_notebook(f"views-{model}.ipynb", [c.format(model=model) if i == 0 else c for i, c in enumerate(CELLS)])
    open_notebook(page, lab, name)
    assert run_all_cells(page) == []
    facts = json.loads(page.locator(".jp-OutputArea-output", has_text="FACTS").first.inner_text().split("FACTS", 1)[1])
    S, layers, k, E = facts["S"], facts["layers"], facts["k"], facts["E"]
    caption = page.locator(".wb-routing-caption").first
    caption.wait_for(timeout=60_000)
    assert caption.inner_text().startswith(f"live: tokens 0-{S - 1} of {S} (page 1/1) x {len(layers)} MoE layers, "
                                           f"top-{k} of {E}")
    assert _painted_pixels(page, "canvas.wb-routing-grid") > 1000
    assert page.locator(".wb-routing-load-stat").count() == len(layers)

    # a short prompt gets wide cells with the expert number in them, the token texts along the x axis
    geo = _grid_geometry(page)
    assert geo["cellW"] == 36 and geo["cellH"] >= 24
    assert _token_labels(page) == [_visible(t) for t in facts["text"]]  # whitespace made visible
    assert "\u21b5" in "".join(_token_labels(page)) and "\u00b7" in "".join(_token_labels(page))
    band = (geo["gridX"], geo["labelY"], S * geo["cellW"], 20)
    assert _painted_pixels(page, "canvas.wb-routing-grid", band) > 8 * S  # the labels are painted, not only listed
    assert all(_cell_ink(page, i, 0) > 5 for i in range(3))  # expert numbers drawn in the cells
    legend = page.locator(".wb-routing-legend-item").evaluate_all(
        "els => els.map(e => [Number(e.dataset.expert), Number(e.dataset.count)])")
    assert sum(c for _, c in legend) == S * len(layers) and all(0 <= e < E for e, _ in legend)

    # hover a token: its top-k experts in every MoE layer, its row and column highlighted; click: the detail table
    x, y = _cell_point(page, 3, 0)
    page.mouse.move(x, y)
    tip = page.locator(".wb-routing-tip").first
    assert tip.is_visible() and tip.inner_text().startswith(f'token 3 {json.dumps(facts["text"][3])}')
    assert all(re.search(rf"L{layer}: e\d+ \d\.\d\d  e\d+", tip.inner_text()) for layer in layers)
    root = page.locator(".wb-routing").first
    assert (root.get_attribute("data-hover-token"), root.get_attribute("data-hover-layer")) == ("3", str(layers[0]))
    assert _painted_pixels(page, "canvas.wb-routing-overlay") > 0
    page.mouse.click(x, y)
    rows = page.locator(".wb-routing-detail-table tr[data-layer]")
    assert rows.count() == len(layers)
    mark = "#" if layers[0] in facts["hash"] else ""  # V4's hash-routed layers are marked
    assert re.fullmatch(rf"{mark}L{layers[0]}\s+e\d+ \d\.\d{{3}}(\s+e\d+ \d\.\d{{3}}){{{k - 1}}}",
                        rows.first.inner_text().strip())
    assert root.get_attribute("data-selected") == "3"
    assert page.locator('.wb-routing-tokens li[aria-current="true"]').first.get_attribute("data-token") == "3"
    # hover a legend entry: the cells of every other top-1 expert fade (and the cursor has left the grid)
    page.locator(".wb-routing-legend-item").first.hover()
    assert root.get_attribute("data-hover-token") == ""
    assert _painted_pixels(page, "canvas.wb-routing-overlay") > 0.5 * (S * len(layers) - legend[0][1]) * 36 * 24
    shot(page, f"views-routing-{model}")

    _tab(page, "Specialisation")
    spec = page.locator(".wb-spec").first
    spec.wait_for()
    assert re.search(rf"layer {layers[0]}, expert \d+: chosen [1-9]\d* times", spec.inner_text())  # the busiest
    assert page.locator(".wb-spec-partners tr").count() >= 2
    shot(page, f"views-specialisation-{model}")

    _tab(page, "KV compression")
    costs = page.locator(".wb-kv-row")
    costs.first.wait_for()
    assert costs.count() == 7 and "68.6 KiB" in page.locator('.wb-kv-row[data-name="deepseek-v3"]').inner_text()
    if facts["v4"]:  # no MLA latent: said plainly, and the sparse-attention truncation instead of the rank
        assert page.locator(".wb-kv-no-latent").count() >= 1 and page.locator(".wb-kv-sparse-result").count() == 1
    else:
        assert page.locator("svg.wb-kv-spectrum circle").count() == 2 * facts["C"]
    shot(page, f"views-kv-{model}")

    _tab(page, "FP8 error")
    page.locator(".wb-fp8-heat-cell").first.wait_for()
    values = [float(v) for v in page.locator(".wb-fp8-heat-cell").evaluate_all("els => els.map(e => e.dataset.value)")
              if v != "nan"]
    assert len(values) >= 10 and all(0.001 < v < 0.2 for v in values)
    assert page.locator(".wb-fp8-flip").count() == len(layers)
    shot(page, f"views-fp8-{model}")

    if facts["v4"]:  # the V4 tabs: what a query reads, and the mHC heat maps (4 x 4 per layer, site and mean / token)
        _tab(page, "Sparse attention")
        page.locator(".wb-sa-entry").first.wait_for(timeout=30_000)
        assert page.locator(".wb-sa-layer-button").count() == len(layers)  # every V4 layer attends (and routes)
        _tab(page, "mHC")
        page.locator(".wb-hc-cell").first.wait_for(timeout=30_000)
        means = page.locator('.wb-hc-cell[data-which="mean"]').evaluate_all("els => els.map(e => +e.dataset.value)")
        assert len(means) == 2 * 16 * len(layers) and all(0 <= v <= 1 for v in means)
        rows = [sum(means[i:i + 4]) for i in range(0, len(means), 4)]  # Sinkhorn: each row of M sums to 1
        assert all(abs(r - 1) < 0.02 for r in rows), rows
        shot(page, "views-mhc")

    # move the top-k slider: the tuner's report and then the routing grid change
    _tab(page, "Live tuner")
    report = page.locator(".wb-tuner-report").first
    report.wait_for()
    assert report.get_attribute("data-generation") == "0"
    handle = _slider_handle(page, "top-k")
    handle.focus()
    handle.press("ArrowLeft")
    page.wait_for_function("""() => { const r = document.querySelector('.wb-tuner-report');
        return r && r.dataset.generation !== '0'; }""", timeout=30_000)
    controls = json.loads(page.locator(".wb-tuner-report").first.get_attribute("data-controls"))
    assert controls == {"latent": {}, "routing": {"all": {"top_k": k - 1}}}
    assert float(page.locator(".wb-tuner-report").first.get_attribute("data-kl")) > 0
    shot(page, f"views-tuner-{model}")
    _tab(page, "Routing")
    if facts["hash"]:  # hash layers keep their k table experts (the caption's top-k): the learned rows shrink
        for token in range(S):  # the grid redraws when the run's routing arrives; each click pins a fresh token
            page.mouse.click(*_cell_point(page, token, 0))
            last = page.locator(f'.wb-routing-detail-table tr[data-layer="{layers[-1]}"]').first
            if len(re.findall(r"e\d+", last.inner_text())) == k - 1:
                break
            page.wait_for_timeout(500)
        assert len(re.findall(r"e\d+", last.inner_text())) == k - 1, last.inner_text()
    else:
        page.locator(".wb-routing-caption", has_text=f"top-{k - 1} of {E}").first.wait_for(timeout=30_000)
    _check_static_export(lab, page, facts)


def _check_static_export(lab: LabServer, page: Any, facts: dict[str, Any]) -> None:
    """The export the notebook's second cell wrote (before the slider moved) renders on its own."""
    page.goto(lab.url("files/views-export.html"), wait_until="load")
    caption = page.locator(".wb-routing-caption").first
    caption.wait_for(timeout=30_000)
    S, k, E = facts["S"], facts["k"], facts["E"]
    assert caption.inner_text().startswith(f"live: tokens 0-{S - 1} of {S}") and f"top-{k} of {E}" in caption.inner_text()
    assert _painted_pixels(page, "canvas.wb-routing-grid") > 1000
    assert page.locator(".wb-fp8-heat-cell").count() > 0 and page.locator(".wb-kv-row").count() == 7
    assert _token_labels(page)[0] == _visible(facts["text"][0])
    page.mouse.click(*_cell_point(page, 0, 0))
    assert page.locator(".wb-routing-detail-table tr[data-layer]").count() == len(facts["layers"])
    shot(page, "views-export-v4" if facts["v4"] else "views-export-v3")


def test_large_trace_is_paged(lab: LabServer, page: Any) -> None:
    """A 100k-token trace: the browser gets one page of 256 tokens, and the page slider moves through it."""
    cells = ["import numpy as np\nfrom workbench.trace import from_vllm_routed_experts\n"
             "from workbench.widgets import RoutingExplorer\n"
             "routed = np.argsort(np.random.default_rng(0).random((100_000, 2, 16)), axis=2)[:, :, :4]\n"
             "rx = RoutingExplorer(trace=from_vllm_routed_experts(routed, moe_layers=[1, 2], n_experts=16))\nrx"]
    name = lab.make_notebook("large.ipynb", cells)
    open_notebook(page, lab, name)
    assert run_all_cells(page) == []
    root = page.locator(".wb-routing").first
    root.wait_for(timeout=60_000)
    assert root.get_attribute("data-tokens") == "256"
    geo = _grid_geometry(page)
    assert geo["cellW"] == 14 and geo["mode"] in ("flat", "vertical")  # a full page keeps the dense layout
    assert _cell_ink(page, 0, 0) == 0  # colour only: no room for numbers
    assert _token_labels(page)[:2] == ["0", "1"] and len(_token_labels(page)) == 256  # no text stored: positions
    assert page.locator(".wb-routing-caption").first.inner_text().startswith(
        "trace: tokens 0-255 of 100000 (page 1/391)")
    handle = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="page")).locator(".noUi-handle")
    handle.first.focus()
    handle.first.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('.wb-routing').dataset.start === '256'", timeout=30_000)
    assert page.locator(".wb-routing-caption").first.inner_text().startswith("trace: tokens 256-511 of 100000 (page 2/391)")
    assert _token_labels(page)[0] == "256"
    shot(page, "views-large-trace")
