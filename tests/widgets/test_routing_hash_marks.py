"""The routing view marks DeepSeek-V4's hash-routed layers: the page names exactly the config's hash layers (live) or
the trace's `hash_routed` coordinate / layout attr (stored), with the token ids tid2eid is read with; V2/V3 and older
traces have none. The grid draws the marks from that data; it mirrors to Panel and exports statically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from tests.widgets.conftest import synthetic_routing
from workbench.loader import LoadedModel
from workbench.trace.recorder import trace as record_trace
from workbench.widgets.app import mirror
from workbench.widgets.live import LiveSession
from workbench.widgets.routing import RoutingExplorer
from workbench.widgets.routing_page import hash_routed_layers, routing_page

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2 + "def f(x): return x * 2"


@pytest.fixture(scope="module")
def v4_trace(v4: LoadedModel) -> xr.Dataset:
    with record_trace(v4.model, sites=["expert_ids", "expert_weights"], tokenizer=v4.tokenizer,
                      checkpoint=v4.digest) as t:
        v4.model(torch.tensor([[0, *v4.tokenizer.encode(PROMPT)]]))
    return t.to_xarray()


def test_live_page_marks_the_configs_hash_layers_and_their_experts_are_tid2eid(v4: LoadedModel) -> None:
    cfg = v4.model.config
    want = [layer for layer in cfg.moe_layers if cfg.is_hash_layer(layer)]
    assert want == [0] and cfg.num_hash_layers == 1
    view = RoutingExplorer(live=LiveSession(v4, PROMPT, continuation=0))
    page = view.grid.data
    assert page["hash_layers"] == want
    ids = view.live.input_ids[0].tolist() if view.live is not None else []
    assert page["token_ids"] == ids
    # what the mark claims: the marked row's experts are tid2eid[token id]
    n, L, k = len(page["text"]), len(page["layers"]), page["top_k"]
    experts = np.array(page["expert_ids"]).reshape(n, L, k)
    table = v4.model.layers[0].mlp.gate.tid2eid
    np.testing.assert_array_equal(experts[:, page["layers"].index(0)], table[torch.tensor(ids)].numpy())
    assert not (experts[:, 1] == table[torch.tensor(ids)].numpy()).all()  # a gated layer is not


def test_a_traces_coordinate_or_layout_names_the_hash_layers(v4_trace: xr.Dataset) -> None:
    assert v4_trace["hash_routed"].values.tolist() == [True, False, False, False]
    assert hash_routed_layers(v4_trace) == [0]
    page = routing_page(v4_trace, 0)
    assert page["hash_layers"] == [0] and page["token_ids"] == v4_trace["token_id"].values.tolist()
    no_coord = v4_trace.drop_vars("hash_routed")  # a plain zarr reader's view: the layout attr still says
    assert json.loads(no_coord.attrs["layout"])["hash_layers"] == [0] and hash_routed_layers(no_coord) == [0]
    view = RoutingExplorer(trace=v4_trace)
    assert view.live is None and view.grid.data["hash_layers"] == [0]
    with pytest.raises(ValueError, match=r"hash_layers \[7\] are not MoE layers"):
        routing_page(v4_trace, 0, hash_layers=[7])


def test_v3_and_older_traces_mark_nothing(live: LiveSession) -> None:
    view = RoutingExplorer(live=live)
    assert view.grid.data["hash_layers"] == [] and "token_ids" not in view.grid.data
    old = synthetic_routing(40)  # a 1.1-style store: no hash_routed coordinate, no hash_layers in its layout
    assert hash_routed_layers(old) == [] and routing_page(old, 0)["hash_layers"] == []


def test_the_grid_draws_marks_from_the_page_and_exports_them(v4: LoadedModel, tmp_path) -> None:
    view = RoutingExplorer(live=LiveSession(v4, PROMPT, continuation=0))
    mirror(view)
    page = view.save_html(tmp_path / "routing.html").read_text()
    state = json.loads(page.split("window.__WB_STATE__ = ", 1)[1].split(";</script>", 1)[0])
    (grid,) = state.values()
    assert grid["data"]["hash_layers"] == [0]
    assert "hash-routed: experts = tid2eid[" in page and "dataset.hashRouted" in page  # the ESM that marks rows
