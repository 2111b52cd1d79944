"""The grid's payload: a page equals the trace's own arrays (read back through xarray), the loads equal
analysis.expert_load, and its size does not grow with the trace (the paging bound)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.widgets.conftest import synthetic_routing
from workbench import analysis
from workbench.widgets.routing_page import load_per_layer, n_pages, routing_page, token_choices


def test_page_equals_the_trace_slice() -> None:
    ds = synthetic_routing(1000)
    page = routing_page(ds, 2, page_tokens=300)
    assert (page["start"], page["n_total"], page["n_pages"]) == (600, 1000, 4)
    want_ids = ds["expert_ids"].isel(token=slice(600, 900)).values  # [300, L, k]
    assert np.array_equal(np.array(page["expert_ids"]).reshape(want_ids.shape), want_ids)
    want_w = ds["expert_weights"].isel(token=slice(600, 900)).values
    np.testing.assert_allclose(np.array(page["weights"], dtype=float).reshape(want_w.shape), want_w, atol=5e-5)
    assert page["text"] == [str(t) for t in ds["text"].values[600:900]]
    assert page["layers"] == [1, 2] and page["top_k"] == 4 and page["n_experts"] == 16


def test_last_page_is_short_and_loads_match_analysis() -> None:
    ds = synthetic_routing(1000)
    page = routing_page(ds, 3, page_tokens=300)
    assert len(page["text"]) == 100
    want = analysis.expert_load(ds).values  # [L, E]
    assert np.array_equal(np.array(page["load"]).reshape(want.shape), want)
    assert want.sum() == 1000 * 2 * 4


def test_payload_is_bounded_by_the_page_not_the_trace() -> None:
    small, large = synthetic_routing(2_000, seed=1), synthetic_routing(100_000, seed=1)
    a = len(json.dumps(routing_page(small, 0, page_tokens=256)))
    b = len(json.dumps(routing_page(large, 0, page_tokens=256)))
    # identical shapes; only the load counts grow a few digits (L*E numbers): well under 1% of the page
    assert abs(a - b) < 0.01 * a
    raw = large["expert_ids"].nbytes + large["expert_weights"].nbytes
    assert b < raw / 50  # what the browser gets is a small fraction of the arrays it would otherwise receive


def test_missing_weights_become_null_and_json_is_strict() -> None:
    ds = synthetic_routing(10).drop_vars("expert_weights")
    page = routing_page(ds, 0, page_tokens=8)
    assert page["weights"] == [None] * (8 * 2 * 4)
    json.dumps(page, allow_nan=False)  # browsers reject NaN in JSON


@pytest.mark.parametrize("page", [-1, 4, 1.5, True])
def test_bad_page_is_named(page: object) -> None:
    ds = synthetic_routing(1000)
    with pytest.raises(ValueError, match=r"page .* is outside 0\.\.3"):
        routing_page(ds, page, page_tokens=300)  # type: ignore[arg-type]


@pytest.mark.parametrize("page_tokens", [0, 1.5, True])
def test_bad_page_tokens_are_named(page_tokens: object) -> None:
    with pytest.raises(ValueError, match="page_tokens must be an int >= 1"):
        routing_page(synthetic_routing(10), 0, page_tokens=page_tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [50, -1, 1.5, True, "3"])
def test_token_choices_take_a_token_of_the_source(token: object) -> None:
    with pytest.raises(ValueError, match=r"token .* is outside 0\.\.49"):
        token_choices(synthetic_routing(50), token)  # type: ignore[arg-type]


def test_token_choices_and_bounds() -> None:
    ds = synthetic_routing(50)
    rows = token_choices(ds, 7)
    assert [r["layer"] for r in rows] == [1, 2]
    assert rows[1]["experts"] == ds["expert_ids"].values[7, 1].tolist()
    with pytest.raises(ValueError, match="token 50 is outside 0..49"):
        token_choices(ds, 50)
    assert n_pages(0, 10) == 1 and n_pages(11, 10) == 2
    assert load_per_layer(ds).shape == (2, 16)
