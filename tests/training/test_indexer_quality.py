"""The indexer-quality figures of the model card: the recency and chance baselines against plain loops, and the
table's indexer recall against `analysis.indexer_recall` on the same trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import analysis
from workbench.trace.dense_topk import dense_attention_topk
from workbench.training.indexer_quality import chance_recall, indexer_recall_table, recency_selection


@pytest.fixture(scope="module")
def v4():
    return wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny-v4"), seed=3)


@pytest.fixture(scope="module")
def windows(v4):
    return torch.randint(0, v4.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def ds(v4, windows):
    with wb.trace(v4, sites=["index_selected"]) as t:
        v4(windows)
    return t.to_xarray()


def test_recency_and_chance_equal_plain_loops(ds):
    got, chance = recency_selection(ds), chance_recall(ds)
    k = ds.sizes["index_k"]
    for i, layer in enumerate(ds.index_layer.values):
        m = int(ds.compress_ratio.values[layer])
        ratios = []
        for n, p in enumerate(ds.pos.values):
            complete = (int(p) + 1) // m
            want = sorted(range(max(0, complete - k), complete))
            assert sorted(int(v) for v in got[n, i] if v >= 0) == want
            if complete > k:
                ratios.append(k / complete)
        assert chance[i] == pytest.approx(np.mean(ratios), rel=1e-12)


def test_table_matches_the_analysis_and_recency_is_exact_for_recent_picks(v4, windows, ds):
    rows = indexer_recall_table(v4, windows)
    dense = dense_attention_topk(v4, windows)
    want = analysis.indexer_recall(ds, dense)
    assert [r["layer"] for r in rows] == [int(v) for v in ds.index_layer.values] == [1, 3]
    for i, r in enumerate(rows):
        assert r["recall"] == pytest.approx(float(want.recall.values[i]), abs=0)
        assert r["queries"] == int(want.queries.values[i]) > 0
        assert 0 <= r["recency"] <= 1 and 0 < r["chance"] < 1
    # a selection that is exactly the recency picks has the recency baseline's recall
    same = analysis.indexer_recall(ds.assign(index_selected=(ds.index_selected.dims, recency_selection(ds))), dense)
    assert [float(v) for v in same.recall.values] == [r["recency"] for r in rows]


def test_a_model_without_an_indexer_is_refused():
    model = wb.DeepSeekModel.random(wb.ModelConfig.from_name("tiny"), seed=0)
    with pytest.raises(ValueError, match="no lightning indexer"):
        indexer_recall_table(model, torch.zeros(1, 8, dtype=torch.long))
