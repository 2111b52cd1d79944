"""RoutingExplorer: the grid shows the source chosen, follows the live session's controls, pages a stored trace,
and refuses a trace of another model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from tests.widgets.conftest import synthetic_routing
from workbench.controls import Controls, RoutingControl
from workbench.loader import LoadedModel
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer
from workbench.widgets import RoutingExplorer
from workbench.widgets.live import LiveSession
from workbench.widgets.trace_source import TraceMismatchError


def _model_routing(live: LiveSession, controls: Controls) -> np.ndarray:
    """Expert ids [S, L, k] straight from the model's probes (not through the recorder or the view)."""
    got = {}
    names = [f"blocks.{layer}.mlp.hook_expert_indices" for layer in live.config.moe_layers]
    resolved = controls.resolve(live.config)
    with live.model.probes.listen(names, lambda n, v: got.__setitem__(int(n.split(".")[1]), v.clone())):
        live.model(live.input_ids, controls=resolved)
    return torch.stack([got[layer] for layer in live.config.moe_layers], dim=1).numpy()


def test_live_grid_equals_the_model_routing_and_follows_controls(live: LiveSession) -> None:
    view = RoutingExplorer(live=live)
    d = view.grid.data
    S, L, k = live.input_ids.shape[1], len(live.config.moe_layers), live.config.num_experts_per_tok
    assert d["source"] == "live" and d["n_total"] == S
    assert np.array_equal(np.array(d["expert_ids"]).reshape(S, L, k), _model_routing(live, Controls()))
    controls = live.update(routing={"all": RoutingControl(top_k=2)})
    d = view.grid.data
    assert d["top_k"] == 2
    assert np.array_equal(np.array(d["expert_ids"]).reshape(S, L, 2), _model_routing(live, controls))


def test_stored_trace_pages_and_switches_sources(live: LiveSession, corpus_trace: xr.Dataset) -> None:
    view = RoutingExplorer(live=live, trace=corpus_trace, page_tokens=16)
    assert view.source_picker.options == ("live", "trace") and view.source == "trace"
    N = int(corpus_trace.sizes["token"])
    assert view.page_slider.max == -(-N // 16) - 1
    view.show_page(1)
    d = view.grid.data
    assert d["start"] == 16 and d["n_total"] == N
    assert d["text"] == [str(t) for t in corpus_trace["text"].values[16:32]]
    view.grid.selected = 20  # what a click in the browser sets
    assert view.selected_choices()[0]["experts"] == corpus_trace["expert_ids"].values[20, 0].tolist()
    with pytest.raises(ValueError, match="page 99 is outside"):
        view.show_page(99)
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        view.set_source("nope")


@pytest.mark.parametrize("page", [1.5, 0.0, -1, 4, True, "1", None])
def test_show_page_takes_a_whole_page_number_in_range(page: object) -> None:
    view = RoutingExplorer(trace=synthetic_routing(1000), page_tokens=256)  # pages 0..3
    view.show_page(2)
    with pytest.raises(ValueError, match=r"page .* is outside 0\.\.3 \(a whole page number\)"):
        view.show_page(page)  # type: ignore[arg-type]
    assert view.page_slider.value == 2 and view.grid.data["page"] == 2  # (1.5 was floored to page 1 before)
    view.show_page(np.int64(3))  # type: ignore[arg-type]
    assert view.grid.data["page"] == 3


@pytest.mark.parametrize("token", [1000, 5000, -2])
def test_a_selected_token_outside_the_source_is_refused(token: int) -> None:
    view = RoutingExplorer(trace=synthetic_routing(1000), page_tokens=256)
    view.grid.selected = 999  # the last token: on another page than the one shown, still in the source
    assert view.selected_choices()[0]["layer"] == 1
    with pytest.raises(ValueError, match=r"selected token -?\d+ is outside 0\.\.999 \(-1: none\) of this 1000-token"):
        view.grid.selected = token
    assert view.grid.selected == 999
    view.grid.selected = -1
    assert view.selected_choices() == []


def test_switching_to_a_shorter_source_clears_the_selection(live: LiveSession) -> None:
    view = RoutingExplorer(live=live, trace=synthetic_routing(1000))
    view.grid.selected = 900
    view.set_source("live")  # the prompt has far fewer tokens: the selection cannot carry over
    n = view.grid.data["n_total"]
    assert view.grid.selected == -1 and n < 900
    with pytest.raises(ValueError, match=f"outside 0\\.\\.{n - 1}"):
        view.grid.selected = n


@pytest.mark.parametrize("page_tokens", [0, -5, 1.5, True])
def test_bad_page_tokens_are_named(page_tokens: object) -> None:
    with pytest.raises(ValueError, match=r"page_tokens must be an int >= 1"):
        RoutingExplorer(trace=synthetic_routing(10), page_tokens=page_tokens)  # type: ignore[arg-type]


def test_trace_alone_needs_no_model() -> None:
    ds = synthetic_routing(5000)
    view = RoutingExplorer(trace=ds, page_tokens=1000)
    assert view.live is None and view.source == "trace"
    assert len(view.grid.data["text"]) == 1000 and view.page_slider.max == 4


def test_a_trace_of_another_model_is_refused(live: LiveSession, loaded: LoadedModel) -> None:
    cfg = loaded.model.config
    for other, match in [(cfg.replace(num_experts_per_tok=2), r"config fields \['num_experts_per_tok'\]"),
                         (cfg, r"recorded with checkpoint 'random:tiny:7'")]:
        model = DeepSeekModel.random(other, seed=7)
        foreign = LoadedModel(model, ByteTokenizer(), "other", "random:tiny:7")
        from workbench.trace.recorder import trace as record_trace

        with record_trace(model, sites=["expert_ids"], checkpoint=foreign.digest) as t:
            model(torch.tensor([[0, 5, 6, 7]]))
        with pytest.raises(TraceMismatchError, match=match):
            RoutingExplorer(live=live, trace=t.to_xarray())


def test_store_path_opens_lazily(tmp_path, loaded: LoadedModel, live: LiveSession) -> None:  # type: ignore[no-untyped-def]
    from tests.trace.trace_helpers import corpus, write_store

    store = tmp_path / "c.zarr"
    write_store(store, loaded, corpus(12), chunk_tokens=16)
    view = RoutingExplorer(live=live, trace=store, page_tokens=32)
    view.set_source("trace")
    ds = view.dataset()
    assert view.grid.data["n_total"] == int(ds.sizes["token"])
    assert view.grid.data["expert_ids"] == ds["expert_ids"].values[:32].reshape(-1).tolist()
    with pytest.raises(FileNotFoundError):
        RoutingExplorer(live=live, trace=tmp_path / "missing.zarr")
