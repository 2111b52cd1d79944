"""ExpertSpecialisation: what it shows equals the analysis (and plain numpy counts) for the chosen expert; bad layer
or expert ids are named."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from workbench import analysis
from workbench.widgets import ExpertSpecialisation
from workbench.widgets.live import LiveSession
from workbench.widgets.specialisation_data import coactivation_partners, examples_in_context


def test_summary_equals_analysis_and_numpy(live: LiveSession, corpus_trace: xr.Dataset) -> None:
    view = ExpertSpecialisation(live=live, trace=corpus_trace, min_count=2)
    assert view.source == "trace"
    layer, li = 2, 1
    ids = corpus_trace["expert_ids"].values[:, li]  # [N, k]
    expert = int(np.bincount(ids.reshape(-1)).argmax())  # the busiest expert of layer 2
    s = view.summary(layer, expert)
    assert s["load"] == int((ids == expert).sum())
    top = analysis.top_tokens_per_expert(corpus_trace, n=10, min_count=2).sel(layer=layer).isel(expert=expert)
    want = [int(t) for t in top["token_id"].values if t >= 0]
    assert [p["token_id"] for p in s["preferred"]] == want
    for p in s["preferred"]:  # lift from first principles: P(expert | token) / P(expert)
        tok = corpus_trace["token_id"].values
        p_e_given_t = (ids[tok == p["token_id"]] == expert).any(axis=1).mean()
        p_e = (ids == expert).sum() / len(tok)
        assert p["lift"] == pytest.approx(p_e_given_t / p_e, rel=1e-9)
    together = {e: int(((ids == expert).any(1) & (ids == e).any(1)).sum()) for e in range(16) if e != expert}
    best = sorted(together.items(), key=lambda kv: -kv[1])[0][1]
    assert s["partners"][0]["count"] == best
    ex = s["examples"][0]
    first = int(np.nonzero((ids == expert).any(axis=1))[0][0])
    assert ex["token"] == first and ex["text"] == str(corpus_trace["text"].values[first])


def test_picking_an_expert_redraws(live: LiveSession) -> None:
    view = ExpertSpecialisation(live=live)
    ids = live.routing_trace()["expert_ids"].values[:, 0]  # [S, k] first MoE layer
    busiest = int(np.bincount(ids.reshape(-1), minlength=16).argmax())
    assert view.source == "live" and f'data-expert="{busiest}"' in view.report.value  # starts on the busiest
    with pytest.raises(ValueError, match="layer 7 is not a MoE layer"):
        ExpertSpecialisation(live=live, layer=7)
    view.expert_picker.value = 5
    assert 'data-expert="5"' in view.report.value and "layer 1, expert 5" in view.report.value


def test_bad_layer_or_expert_is_named_and_changes_nothing(live: LiveSession) -> None:
    view = ExpertSpecialisation(live=live)
    before = view.report.value
    with pytest.raises(ValueError, match=r"layer 0 is not a MoE layer of this trace; its MoE layers are \[1, 2\]"):
        view.select(0, 1)
    with pytest.raises(ValueError, match=r"expert 16 is outside 0\.\.15"):
        view.select(1, 16)
    with pytest.raises(ValueError, match="expert -1"):
        view.summary(1, -1)
    assert view.report.value == before


def test_examples_keep_to_their_sequence_and_partners_skip_self(corpus_trace: xr.Dataset) -> None:
    for ex in examples_in_context(corpus_trace, 1, 3, n=50, window=30):
        seq = corpus_trace["seq"].values
        same = corpus_trace["text"].values[seq == seq[ex["token"]]]
        assert ex["before"] + ex["text"] + ex["after"] in "".join(map(str, same))
    coact = analysis.coactivation(corpus_trace)
    assert all(p["expert"] != 3 for p in coactivation_partners(coact, 1, 3, n=16))
