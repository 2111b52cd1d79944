"""The views in a real browser: control-to-view latency, first render, and bytes sent for a 100k-token trace.

Usage: python benchmarks/bench_ui.py [--moves 15] [--tokens 100000] [--skip-browser]
1. Bytes: the routing grid's payload for a 100k-token trace (one page of 256 tokens + per-layer loads) against the
   named alternative, shipping the trace's routing arrays themselves (expert_ids + expert_weights: their raw bytes,
   and the same as JSON, which is what a widget would actually send).
2. First render: a JupyterLab (tests/browser/harness.py) runs a notebook that builds `Workbench()` on the default
   model; time from "run all" to the routing grid drawn in Chromium, and the in-kernel build time alone.
3. Latency: the tuner's top-k slider is moved with the keyboard `--moves` times (alternating left/right); each move
   is timed in the page from the keydown to the tuner report showing the new generation (kernel round trip,
   Session.apply, HTML update, render), median reported beside the median time Session.apply itself took for those
   same moves in the kernel (the compute floor, `ApplyResult.elapsed_ms`). Goal: under 250 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "def add(a, b):\n    return a + b\n"


def routing_trace(n_tokens: int, layers: tuple[int, ...] = (1, 2), k: int = 4, n_experts: int = 16):  # type: ignore[no-untyped-def]
    """A routing trace of n_tokens (random distinct experts) with the given MoE layers, top-k and experts."""
    from workbench.trace.schema import SCHEMA_VERSION, Layout, build_dataset

    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((n_tokens, len(layers), n_experts)), axis=2)[:, :, :k].astype(np.int16)  # [N, L, k]
    w = rng.random((n_tokens, len(layers), k)).astype(np.float32)  # [N, L, k]
    tok = rng.integers(2, 258, n_tokens).astype(np.int32)
    layout = Layout(("expert_ids", "expert_weights"), layers, max(layers) + 1, k, n_experts, 0, ())
    zeros = np.zeros(n_tokens, np.int32)
    arrays = {"token_id": (("token",), tok), "doc": (("token",), zeros), "seq": (("token",), zeros),
              "pos": (("token",), np.arange(n_tokens, dtype=np.int32)),
              "text": (("token",), np.array([chr(t - 2) for t in tok], dtype=object)),
              "expert_ids": (("token", "layer", "slot"), ids), "expert_weights": (("token", "layer", "slot"), w)}
    return build_dataset(arrays, layout, {"schema_version": SCHEMA_VERSION, "complete": True,
                                          "layout": json.dumps(layout.to_json())})


def bench_bytes(n_tokens: int) -> None:
    from workbench.loader import load_model
    from workbench.widgets import RoutingExplorer

    cfg = load_model("default").model.config  # shaped like the default model's routing
    ds = routing_trace(n_tokens, tuple(cfg.moe_layers), cfg.num_experts_per_tok, cfg.n_routed_experts)
    t0 = time.perf_counter()
    view = RoutingExplorer(trace=ds)
    build = time.perf_counter() - t0
    payload = len(json.dumps(view.grid.data, allow_nan=False).encode())
    raw = ds["expert_ids"].nbytes + ds["expert_weights"].nbytes
    as_json = len(json.dumps({"expert_ids": ds["expert_ids"].values.tolist(),
                              "weights": np.round(ds["expert_weights"].values.astype(float), 4).tolist()}).encode())
    print(f"\n[bytes] routing grid for a {n_tokens:,}-token trace, {len(cfg.moe_layers)} MoE layers x top-"
          f"{cfg.num_experts_per_tok} of {cfg.n_routed_experts} (view built in {build:.2f} s)")
    print(f"  sent to the browser: {payload:>12,} B  (one page of {view.page_tokens} tokens + [L, E] loads)")
    print(f"  raw arrays:          {raw:>12,} B  ratio {raw / payload:8.1f}x")
    print(f"  raw arrays as JSON:  {as_json:>12,} B  ratio {as_json / payload:8.1f}x")


def bench_browser(moves: int) -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser.harness import CHROMIUM, CHROMIUM_ARGS, LabServer, is_offsite, open_notebook, run_all_cells
    cells = ["import time; _t0 = time.perf_counter()\nfrom workbench.loader import load_model\n"
             "from workbench.widgets import Workbench\n_t1 = time.perf_counter()\nloaded = load_model('default')\n"
             f"_t2 = time.perf_counter()\nwb = Workbench(loaded, prompt={PROMPT!r})\n"
             "print(f'build {time.perf_counter() - _t0:.2f} s (imports {_t1 - _t0:.2f} s, model load {_t2 - _t1:.2f} s,'"
             " f' dashboard {time.perf_counter() - _t2:.2f} s)')\nwb"]
    with tempfile.TemporaryDirectory() as tmp:
        root, home = Path(tmp, "root"), Path(tmp, "home")
        root.mkdir()
        home.mkdir()
        lab = LabServer(root, home, Path(tmp, "lab.log"))
        requested: list[str] = []
        build_line = ""
        try:
            name = lab.make_notebook("bench.ipynb", cells)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.on("request", lambda r: requested.append(r.url))
                open_notebook(page, lab, name)
                t0 = time.perf_counter()
                errors = run_all_cells(page)
                page.locator(".wb-routing-caption").first.wait_for(timeout=120_000)
                first_render = time.perf_counter() - t0
                if errors:
                    raise RuntimeError(f"the notebook failed: {errors}")
                build_line = page.locator(".jp-OutputArea-output", has_text="build ").first.inner_text().strip()
                page.locator(".widget-tab .lm-TabBar-tab", has_text="Live tuner").first.click()
                page.locator(".wb-tuner-report").first.wait_for()
                handle = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="top-k")) \
                    .locator(".noUi-handle").first
                handle.focus()
                latencies, floor, whole, whole_floor = [], [], [], []
                for i in range(moves + 1):
                    # the report comes first (data-pending="1"), the same report with its continuation after
                    page.evaluate("""() => { window.__wbLatency = null; window.__wbFull = null;
                        const g0 = document.querySelector('.wb-tuner-report').dataset.generation; let t0 = null;
                        document.addEventListener('keydown', () => { t0 = performance.now(); },
                                                  { capture: true, once: true });
                        const obs = new MutationObserver(() => { const r = document.querySelector('.wb-tuner-report');
                          if (t0 === null || !r || r.dataset.generation === g0) return;
                          if (window.__wbLatency === null) {
                            window.__wbLatency = performance.now() - t0; window.__wbReportMs = r.dataset.elapsedMs; }
                          const c = r.querySelector('.wb-tuner-continuation');
                          if (c && c.dataset.pending === '0') {
                            obs.disconnect(); window.__wbFull = performance.now() - t0; } });
                        obs.observe(document.body, { subtree: true, childList: true, attributes: true }); }""")
                    handle.press("ArrowLeft" if i % 2 == 0 else "ArrowRight")
                    page.wait_for_function("() => window.__wbFull !== null", timeout=30_000)
                    if i:  # the first move warms up
                        latencies.append(float(page.evaluate("() => window.__wbLatency")))
                        floor.append(float(page.evaluate("() => window.__wbReportMs")))
                        whole.append(float(page.evaluate("() => window.__wbFull")))
                        report = page.locator(".wb-tuner-report").first
                        whole_floor.append(float(report.get_attribute("data-elapsed-ms")))
                browser.close()
        finally:
            lab.stop()
    offsite = [u for u in requested if is_offsite(u)]
    print(f"\n[first render] JupyterLab run-all -> routing grid drawn: {first_render:.2f} s (kernel: {build_line})")
    loaded_at = sum(float(x) for x in re.findall(r"(?:imports|model load) ([0-9.]+) s", build_line))
    print(f"  after the model has loaded (run-all minus imports and load, goal < 2 s): {first_render - loaded_at:.2f} s")
    med, base = statistics.median(latencies), statistics.median(floor)
    print(f"[latency] top-k slider move -> tuner report updated, median of {moves} moves: {med:.0f} ms "
          f"(min {min(latencies):.0f}, max {max(latencies):.0f}); goal < 60 ms: {'met' if med < 60 else 'NOT met'}")
    print(f"  peer: Session.apply alone for the same moves (in the kernel, report first): median {base:.0f} ms; "
          f"browser / apply = {med / base:.2f}x (the rest is the kernel and browser round trip)")
    print(f"[latency] ... -> the same report with its greedy continuation: median {statistics.median(whole):.0f} ms "
          f"(the whole apply, report + continuation, in the kernel: {statistics.median(whole_floor):.0f} ms)")
    print(f"[offline] requests off this machine: {len(offsite)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--skip-browser", action="store_true", help="only the bytes (no JupyterLab / Chromium)")
    args = ap.parse_args()
    bench_bytes(args.tokens)
    if not args.skip_browser:
        bench_browser(args.moves)


if __name__ == "__main__":
    main()
