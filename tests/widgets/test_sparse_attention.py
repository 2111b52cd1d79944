"""SparseAttention: what the view says each query reads equals what the model's trace recorder captures on the same
prompt (the indexer's picks and scores, V4's attention mass), the token spans match `analysis.selected_distance`
and compressor.py's overlapping CSA windows, controls from the shared session change the picks, V2/V3 get a plain
message, and the view survives the static export and the Panel mirror."""

from __future__ import annotations

import json
import re

import numpy as np
import panel as pn
import pytest
import torch
import xarray as xr

from workbench import analysis
from workbench.config import PRESETS
from workbench.controls import AttentionControl, Controls
from workbench.loader import LoadedModel
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer
from workbench.trace.recorder import trace as record_trace
from workbench.widgets import SparseAttention, Workbench
from workbench.widgets.app import mirror
from workbench.widgets.html_export import export_html
from workbench.widgets.live import LiveSession

# 104 tokens with BOS: CSA layers (rate 4, index_topk 16) see up to 26 entries, so late queries choose 16 of >16
PROMPT = "def add(a, b):\n    return a + b\n\nThe indexer keeps sixteen compressed blocks per query, sparse at last."
S = len(PROMPT) + 1
WINDOW, TOPK = 32, 16  # tiny-v4's sliding_window and index_topk


@pytest.fixture
def live4(v4: LoadedModel) -> LiveSession:
    return LiveSession(v4, PROMPT, continuation=2)


@pytest.fixture(scope="module")
def v32() -> LoadedModel:
    cfg = PRESETS["tiny"].replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=6)
    return LoadedModel(DeepSeekModel.random(cfg, seed=5), ByteTokenizer(), "tiny-v32-random", "random:tiny-v32:5")


def _recorded(loaded: LoadedModel, ids: torch.Tensor, controls: Controls | None = None) -> xr.Dataset:
    """The trace recorder's view of the same run: an independent path from the probes to the numbers."""
    cfg = loaded.model.config
    resolved = (controls or Controls()).validate(cfg).resolve(cfg)
    sites = ["index_selected", "index_scores"] + (["attn_mass"] if cfg.is_v4 else [])
    with record_trace(loaded.model, sites=sites, tokenizer=loaded.tokenizer, checkpoint=loaded.digest) as t:
        loaded.model(ids, controls=resolved)
    return t.to_xarray()


def _picks(ds: xr.Dataset, layer: int) -> tuple[list[list[int]], list[list[float]]]:
    i = list(ds["index_layer"].values).index(layer)
    sel = ds["index_selected"].values[:, i]  # [S, k]
    scores = ds["index_scores"].values[:, i]  # [S, k]
    return [[int(w) for w in row if w >= 0] for row in sel], [[float(s) for s in row[row == row]] for row in scores]


def test_v4_reads_equal_the_recorded_trace(live4: LiveSession, v4: LoadedModel) -> None:
    view = SparseAttention(live=live4)
    d = view.data
    assert d["family"] == "v4" and d["n"] == S and not d["capped"] and len(d["text"]) == S
    assert [(L["kind"], L["ratio"]) for L in d["layers"]] == [("window", 0), ("CSA", 4), ("HCA", 16), ("CSA", 4)]
    ds = _recorded(v4, live4.input_ids)
    near_far = analysis.selected_distance(ds)
    sparse_queries = 0
    for layer in (1, 3):
        picks, scores = _picks(ds, layer)
        rec = d["layers"][layer]
        assert rec["selected"] == picks and rec["topk"] == TOPK and not rec["reads_all"]
        assert rec["n_entries"] == S // 4
        i = list(ds["index_layer"].values).index(layer)
        for t in range(S):
            got = view.reads(layer, t)
            assert got["chosen"] == picks[t]
            np.testing.assert_allclose(got["scores"], scores[t], rtol=1e-4, atol=1e-9)
            assert got["visible"] == (t + 1) // 4 and len(picks[t]) == min(TOPK, (t + 1) // 4)
            sparse_queries += len(picks[t]) < got["visible"]
            # spans: selected_distance's far/near are the query's distance to the entry's oldest / newest token; a
            # CSA entry pools its own window and the m tokens before it (compressor.py), never before token 0
            for j, (lo, own_lo, hi) in enumerate(got["spans"]):
                assert near_far["far"].values[t, i, j] == t - lo and near_far["near"].values[t, i, j] == t - hi
                assert (lo, own_lo, hi) == (max(0, own_lo - 4), 4 * picks[t][j], 4 * picks[t][j] + 3)
                assert hi <= t  # causal: only complete entries
    assert sparse_queries > 20  # the indexer really drops entries on this prompt
    for t in range(S):
        assert view.reads(0, t)["window"] == [max(0, t - WINDOW + 1), t] and view.reads(0, t)["chosen"] == []
        hca = view.reads(2, t)
        assert hca["chosen"] == list(range((t + 1) // 16)) and hca["scores"] == []  # every complete entry
        assert hca["spans"] == [[16 * w, 16 * w, 16 * w + 15] for w in hca["chosen"]]
    assert d["layers"][2]["reads_all"] and d["layers"][2]["n_entries"] == S // 16

    want = ds["attn_mass"].transpose("token", "layer_all", "head", "branch").values  # [S, L, nH, 3]
    for layer, rec in enumerate(d["layers"]):
        mass = np.array(rec["mass"]).reshape(S, -1, 3)  # [S, nH, 3]
        np.testing.assert_allclose(mass, want[:, layer], atol=6e-5)  # 4 decimals
        np.testing.assert_allclose(mass.sum(-1), 1.0, atol=3e-4)
    assert np.all(np.array(d["layers"][0]["mass"]).reshape(S, -1, 3)[..., 1] == 0)  # window only: no compressed
    r = view.reads(1, S - 1)
    np.testing.assert_allclose(r["mass_mean"], np.mean(r["mass_per_head"], axis=0))


def test_index_topk_and_window_controls_from_the_session(live4: LiveSession, v4: LoadedModel) -> None:
    view = SparseAttention(live=live4)
    before = view.reads(1, S - 1)["chosen"]
    live4.update(attention={"all": AttentionControl(index_topk=4)})  # another view's control: the map follows
    rec = view.data["layers"][1]
    assert rec["topk"] == 4 and rec["control"] == {"index_topk": 4}
    picks, _ = _picks(_recorded(v4, live4.input_ids, Controls.index_topk(4)), 1)
    assert rec["selected"] == picks and view.reads(1, S - 1)["chosen"] == before[:4]  # the best 4 of the 16
    assert all(len(p) == min(4, (t + 1) // 4) for t, p in enumerate(picks))
    assert "index_topk=4" in view.status.value
    live4.update(attention={"all": AttentionControl(index_topk=4, sliding_window=8)})
    assert view.reads(0, 50)["window"] == [43, 50] and view.reads(2, 50)["window"] == [43, 50]
    live4.update(attention={"all": None, 2: AttentionControl(compressed=False), 1: AttentionControl(dense=True)})
    assert view.reads(2, S - 1)["chosen"] == [] and view.data["layers"][2]["n_entries"] == 0
    dense = view.reads(1, S - 1)  # dense: no indexer, every complete entry
    assert view.data["layers"][1]["reads_all"] and dense["chosen"] == list(range(S // 4))
    # layer 3 keeps its indexer (its picks move: its input changed upstream), as a recorded run with these controls
    now = Controls(attention={2: AttentionControl(compressed=False), 1: AttentionControl(dense=True)})
    assert view.data["layers"][3]["selected"] == _picks(_recorded(v4, live4.input_ids, now), 3)[0]
    assert view.data["layers"][3]["topk"] == TOPK and view.data["layers"][3]["control"] == {}


def test_prompt_change_and_picks_follow(live4: LiveSession) -> None:
    view = SparseAttention(live=live4)
    view.query_slider.value = 5
    view.layer_picker.value = 2
    assert (view.map.query, view.map.layer) == (5, 2)
    view.map.layer = 3  # a click on a layer button in the browser: the picker follows
    assert view.layer_picker.value == 3 and view.reads()["layer"] == 3
    live4.set_prompt("a shorter prompt")
    n = len("a shorter prompt") + 1
    assert view.data["n"] == n and view.map.query == n - 1 and view.query_slider.max == n - 1
    assert view.data["text"] == [live4.tokenizer.token_text(int(t)) for t in live4.input_ids[0]]
    with pytest.raises(ValueError, match="outside"):
        view.map.query = n
    with pytest.raises(ValueError, match="not an attention layer"):
        view.map.layer = 7


def test_token_cap_keeps_the_queries_it_shows(live4: LiveSession) -> None:
    full = SparseAttention(live=live4).data
    capped = SparseAttention(live=live4, max_tokens=40)
    d = capped.data
    assert d["n"] == 40 and d["capped"] and d["n_prompt"] == S
    assert "showing the first 40 of the prompt's" in capped.status.value
    for a, b in zip(d["layers"], full["layers"], strict=True):  # causal: the first 40 queries read the same
        assert a["selected"] == (b["selected"][:40] if b["selected"] is not None else None)
        assert len(a["mass"]) == 40 * d["heads"] * 3 and a["mass"] == b["mass"][: len(a["mass"])]
    with pytest.raises(ValueError, match="max_tokens"):
        SparseAttention(live=live4, max_tokens=0)


def test_v32_picks_key_tokens(v32: LoadedModel) -> None:
    prompt = "sparse attention over thirty-odd tokens"
    view = SparseAttention(v32, prompt=prompt)
    d = view.data
    n = len(prompt) + 1
    assert d["family"] == "v32" and [L["kind"] for L in d["layers"]] == ["V3.2 sparse"] * 3
    ds = _recorded(v32, view.live.input_ids)
    dist = analysis.selected_distance(ds)
    for layer in range(3):
        picks, scores = _picks(ds, layer)
        assert d["layers"][layer]["mass"] is None and d["layers"][layer]["window"] == 0
        for t in range(n):
            r = view.reads(layer, t)
            assert r["chosen"] == picks[t] and len(r["chosen"]) == min(6, t + 1) and r["window"] is None
            np.testing.assert_allclose(r["scores"], scores[t], rtol=1e-4, atol=1e-9)
            assert r["spans"] == [[s, s, s] for s in picks[t]] and "mass_mean" not in r
            np.testing.assert_array_equal(dist["near"].values[t, layer, : len(picks[t])], [t - s for s in picks[t]])


def test_dense_model_says_so(loaded: LoadedModel) -> None:
    view = SparseAttention(loaded, prompt="hello")
    assert "runs dense MLA" in view.status.value and "deepseek_v3" in view.status.value
    assert view.map not in view.children  # nothing to draw
    with pytest.raises(ValueError, match="dense MLA"):
        view.reads()
    assert "runs dense MLA" in export_html(view, "t")


def test_static_export_carries_the_data(live4: LiveSession) -> None:
    view = SparseAttention(live=live4)
    page = export_html(view, "sparse")
    state = json.loads(re.search(r"window.__WB_STATE__ = (.*?);</script>", page).group(1).replace("<\\/", "</"))
    (frozen,) = state.values()
    assert frozen["data"] == view.data and frozen["query"] == S - 1 and frozen["layer"] == -1
    assert 'data-wb-esm="sparse_attention"' in page and "function draw(el, api)" in page
    assert not re.search(r"""(src|href)=["']?https?:|import\s.*https?:""", page)  # nothing to fetch (the SVG namespace is a name)


def test_panel_mirror_and_dashboard(live4: LiveSession, v4: LoadedModel) -> None:
    view = SparseAttention(live=live4)
    app = pn.Column(mirror(view))
    (comp,) = app.select(pn.custom.JSComponent)
    assert comp.data == view.data and comp.query == S - 1
    comp.layer = 2  # the browser's layer button under `workbench serve`
    assert view.map.layer == 2 and view.layer_picker.value == 2
    (query,) = [w for w in app.select(pn.widgets.IntSlider) if w.label == "query"]
    query.value = 7
    assert view.map.query == 7 and comp.query == 7

    wb = Workbench(v4, prompt=PROMPT, background=False)
    tab = list(wb.views).index("Sparse attention")
    assert wb.tabs.titles[tab] == "Sparse attention" and wb.tabs.children[tab] is wb.sparse_attention
    assert wb.sparse_attention.live is wb.live and wb.sparse_attention.data["n"] == S
