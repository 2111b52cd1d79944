"""HyperConnections: the heat maps show the probe's mHC matrices (mean over the prompt with numpy, and the chosen
token), the statistics are `analysis.stream_mixing` of a trace recorded by the recorder, an mhc_identity control
shows (and runs) the identity, the view follows live results and prompts, and it mirrors and exports. A model
without mHC says so."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import xarray as xr

from workbench import analysis
from workbench.controls import AttentionControl, Controls
from workbench.loader import LoadedModel
from workbench.trace.schema import HC_SITES
from workbench.widgets.app import mirror
from workbench.widgets.hyper_connections import STATS, HyperConnections
from workbench.widgets.live import LiveSession

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2 + "def f(x): return x * 2"


@pytest.fixture
def view(v4: LoadedModel) -> HyperConnections:
    return HyperConnections(live=LiveSession(v4, PROMPT, continuation=0))


def cells(page: str, which: str) -> np.ndarray:
    """The shown matrices [A, 2, n, n] read back from the cells' data-value attributes."""
    found = re.findall(r'class="wb-hc-cell" data-layer="(\d+)" data-site="(\w+)" data-which="([^"]+)" '
                       r'data-in="(\d+)" data-out="(\d+)" data-value="([^"]+)"', page)
    got = [f for f in found if f[2] == which]
    A, n = max(int(f[0]) for f in got) + 1, max(int(f[3]) for f in got) + 1
    out = np.full((A, len(HC_SITES), n, n), np.nan)
    for layer, site, _, i, j, v in got:
        out[int(layer), HC_SITES.index(site), int(i), int(j)] = float(v)
    assert len(got) == out.size
    return out


def stats_rows(page: str) -> dict[tuple[int, str], dict[str, float]]:
    rows = {}
    for m in re.finditer(r'<tr class="wb-hc-stats" data-layer="(\d+)" data-site="(\w+)" ([^>]*)>', page):
        values = dict(re.findall(r'data-([\w-]+)="([^"]+)"', m.group(3)))
        rows[int(m.group(1)), m.group(2)] = {k.replace("-", "_"): float(v) for k, v in values.items()}
    return rows


def recorded(live: LiveSession, controls: Controls | None = None) -> xr.Dataset:
    return live.trace_prompt(["hc_mix"], controls)  # the trace recorder's own capture of the probes


def test_heat_maps_and_statistics_equal_a_recorded_trace(view: HyperConnections) -> None:
    ds = recorded(view.live)
    mix = ds["hc_mix"].values.astype(np.float64)  # [S, A, 2, n, n]
    page = view.body.value
    np.testing.assert_allclose(cells(page, "mean"), mix.mean(0), rtol=1e-6, atol=1e-7)
    t = view.live.input_ids.shape[1] - 1
    np.testing.assert_allclose(cells(page, f"token {t}"), mix[t], rtol=1e-6, atol=1e-7)
    want = analysis.stream_mixing(ds)
    rows = stats_rows(page)
    assert set(rows) == {(layer, site) for layer in range(4) for site in HC_SITES}
    for (layer, site), got in rows.items():
        for name in STATS:
            assert got[name] == pytest.approx(float(want[name].sel(layer_all=layer, hc_site=site)), rel=1e-6, abs=1e-8)
    assert 0.2 < rows[0, "hc_attn"]["self_weight"] < 0.99  # a random mHC really mixes
    view.token.value = 5
    np.testing.assert_allclose(cells(view.body.value, "token 5"), mix[5], rtol=1e-6, atol=1e-7)
    text = view.live.tokenizer.token_text(int(view.live.input_ids[0, 5]))
    assert f"token 5 ({html.escape(repr(text))})" in view.body.value


def test_identity_mixing_shows_and_runs_the_identity(view: HyperConnections) -> None:
    live = view.live
    view.identity.value = (1,)
    assert live.controls() == Controls(mhc_identity={1: True})
    assert float((live.result.logits - live.session.baseline.logits).abs().max()) > 1e-4  # the run changed
    assert live.result.kl == pytest.approx(live.session.full_run(Controls(mhc_identity={1: True})).kl, abs=1e-9)
    page = view.body.value
    mean = cells(page, "mean")
    np.testing.assert_array_equal(mean[1], np.broadcast_to(np.eye(4), (2, 4, 4)))
    assert re.search(r'class="wb-hc-matrix" data-layer="1" data-site="hc_attn" data-which="mean" data-identity="true"',
                     page)
    rows = stats_rows(page)
    assert rows[1, "hc_ffn"]["dist_identity"] == 0 and rows[1, "hc_ffn"]["self_weight"] == 1
    # the other layers are the probes' matrices of that run (layers after 1 see the unmixed streams)
    mix = recorded(live, Controls(mhc_identity={1: True}))["hc_mix"].values.astype(np.float64)
    for layer in (0, 2, 3):
        np.testing.assert_allclose(mean[layer], mix[:, layer].mean(0), rtol=1e-6, atol=1e-7)
    base = recorded(live)["hc_mix"].values.astype(np.float64)
    assert not np.allclose(mean[2], base[:, 2].mean(0), atol=1e-6)
    view.identity.value = ()
    assert live.controls() == Controls() and live.result.kl == 0.0


def test_follows_live_results_and_prompts(view: HyperConnections) -> None:
    live = view.live
    live.update(attention={"all": AttentionControl(index_topk=1)})
    mix = recorded(live, live.controls())["hc_mix"].values.astype(np.float64)
    np.testing.assert_allclose(cells(view.body.value, "mean"), mix.mean(0), rtol=1e-6, atol=1e-7)
    live.set_prompt("a much shorter prompt")
    S = live.input_ids.shape[1]
    assert view.token.max == S - 1 and view.token.value == S - 1
    assert f'data-token="{S - 1}"' in view.body.value
    mix = recorded(live, live.controls())["hc_mix"].values.astype(np.float64)
    np.testing.assert_allclose(cells(view.body.value, "mean"), mix.mean(0), rtol=1e-6, atol=1e-7)


def test_mirrors_and_exports_the_cells(view: HyperConnections, tmp_path) -> None:
    mirror(view)
    page = view.save_html(tmp_path / "hc.html").read_text()
    assert page.count('class="wb-hc-cell"') == 4 * 2 * 2 * 16  # layers x sites x (mean, token) x n*n
    np.testing.assert_array_equal(cells(page, "mean"), cells(view.body.value, "mean"))
    assert "window.__WB_STATE__ = {};" in page  # plain HTML: no front-end module needed to read it


def test_models_without_mhc_say_so(loaded: LoadedModel) -> None:
    view = HyperConnections(loaded, prompt="a short prompt")
    assert "deepseek_v3 model has no hyper-connections" in view.body.value
    assert view.token.disabled and view.identity.disabled and view.identity.options == ()
    with pytest.raises(ValueError, match="no hyper-connections"):
        view.capture()
    mirror(view)
