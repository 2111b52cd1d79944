"""Workbench: one live session behind all five views; set_prompt refreshes them all; a foreign trace is refused
before anything slow runs; the static export is self-contained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import xarray as xr

from workbench.controls import Controls, RoutingControl
from workbench.loader import LoadedModel
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer
from workbench.trace.recorder import trace as record_trace
from workbench.widgets import ExpertSpecialisation, FP8Error, KVCompression, LiveTuner, RoutingExplorer, Workbench
from workbench.widgets.html_export import export_html
from workbench.widgets.trace_source import TraceMismatchError


@pytest.fixture(scope="module")
def wb(loaded: LoadedModel, corpus_trace: xr.Dataset) -> Workbench:
    return Workbench(loaded, trace=corpus_trace, prompt="hello experts", background=False)


def test_views_share_one_session(wb: Workbench) -> None:
    assert isinstance(wb.routing, RoutingExplorer) and isinstance(wb.tuner, LiveTuner)
    assert isinstance(wb.specialisation, ExpertSpecialisation) and isinstance(wb.kv, KVCompression)
    assert isinstance(wb.fp8, FP8Error)
    assert {v.live for v in (wb.routing, wb.specialisation, wb.kv, wb.fp8, wb.tuner)} == {wb.live}
    assert wb.routing.source_picker.options == ("live", "trace") and wb.routing.source == "trace"
    wb.routing.set_source("live")
    wb.tuner.top_k.value = 1
    assert wb.routing.grid.data["top_k"] == 1  # the grid follows the tuner
    assert wb.kv.error.value.count("data-kl") == 1 and f'{wb.live.result.kl:.6g}' in wb.kv.error.value
    wb.tuner.reset()
    assert wb.live.result.controls == Controls()


def test_set_prompt_refreshes_every_view(wb: Workbench) -> None:
    wb.tuner.top_k.value = 2
    wb.set_prompt("a new prompt")
    S = len("a new prompt") + 1
    assert wb.routing.grid.data["n_total"] == S and wb.routing.grid.data["top_k"] == 2
    assert wb.fp8.comparison is not None and len(wb.fp8.comparison.kl_per_token) == S
    assert wb.prompt_box.value == "a new prompt"
    assert wb.live.result.controls == Controls(routing={"all": RoutingControl(top_k=2)})
    wb.prompt_box.value = ""
    wb.prompt_button.click()
    assert "non-empty string" in wb.prompt_error.value and wb.live.prompt == "a new prompt"
    wb.tuner.reset()


def test_foreign_trace_is_refused(loaded: LoadedModel) -> None:
    other = DeepSeekModel.random(loaded.model.config.replace(n_routed_experts=8, n_group=2, topk_group=1), seed=1)
    with record_trace(other, sites=["expert_ids"], checkpoint="random:other") as t:
        other(torch.tensor([[0, 3, 4, 5]]))
    with pytest.raises(TraceMismatchError, match=r"config fields .*n_routed_experts"):
        Workbench(loaded, trace=t.to_xarray())
    foreign = LoadedModel(other, ByteTokenizer(), "other", "random:other")
    assert foreign.digest != loaded.digest


def test_trace_of_a_fine_tune_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config and shapes, other weights: the checkpoint digest tells the two models apart."""

    from tests.fine_tune import write_fine_tune
    from workbench.loader import load_model
    from workbench.widgets.trace_source import check_trace_matches, load_trace

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuned_dir = write_fine_tune(tmp_path / "tuned")
    original, tuned = load_model(), load_model(tuned_dir)
    with record_trace(original.model, sites=["expert_ids"], checkpoint=original.digest) as t:
        original.model(torch.tensor([[0, *original.tokenizer.encode("def f(x): return x")]]))
    ds = t.to_xarray()
    check_trace_matches(load_trace(ds), original)
    with pytest.raises(TraceMismatchError, match=rf"recorded with checkpoint '{original.digest}', the loaded model "
                                                 rf".*tuned.* is '{tuned.digest}'"):
        check_trace_matches(load_trace(ds), tuned)
    with pytest.raises(TraceMismatchError, match="recorded with checkpoint"):
        Workbench(tuned, trace=ds)


def test_save_html_is_self_contained(wb: Workbench, tmp_path: Path) -> None:
    path = wb.save_html(tmp_path / "dash.html")
    page = path.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    state = json.loads(re.search(r"window.__WB_STATE__ = (.*?);</script>", page, re.S).group(1))  # type: ignore[union-attr]
    assert state["v0"]["data"] == wb.routing.grid.data
    for text in ("Routing explorer", "Expert specialisation", "KV compression", "FP8 error", "Live tuner",
                 "wb-fp8-heat-cell", "wb-kv-costs", "wb-tuner-report"):
        assert text in page
    assert export_html(wb.routing, "t").count('data-wb-esm="routing_grid"') == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wb.save_html(tmp_path / "no" / "dir.html")


def test_hidden_tabs_catch_up_when_selected_and_in_the_export(loaded: LoadedModel, tmp_path: Path) -> None:
    """Only the selected tab refreshes on a live change (a hidden routing grid skips its probed forward); a tab
    coming on screen, and the static export, show the latest state."""
    dash = Workbench(loaded, prompt="hello experts", background=False)
    dash.routing.set_source("live")
    titles = list(dash.views)
    dash.tabs.selected_index = titles.index("Live tuner")
    captures: list[int] = []
    real = dash.live._capture_routing
    dash.live._capture_routing = lambda controls: captures.append(1) or real(controls)  # type: ignore[method-assign]
    dash.tuner.top_k.value = 1
    dash.tuner.top_k.value = 2
    assert captures == [] and dash.routing.grid.data["top_k"] == 4  # hidden: nothing recaptured yet
    dash.tabs.selected_index = titles.index("Routing")
    assert captures == [1] and dash.routing.grid.data["top_k"] == 2  # one catch-up run, at the latest controls
    dash.tabs.selected_index = titles.index("Live tuner")
    dash.tuner.top_k.value = 3
    page = dash.save_html(tmp_path / "d.html").read_text()
    assert dash.routing.grid.data["top_k"] == 3 and '"top_k": 3' in page.replace('"top_k":3', '"top_k": 3')
    assert not dash.routing._shown and dash.tuner._shown  # the export leaves the tabs as they were


def test_tabs_are_built_when_first_shown_and_all_for_the_export(loaded: LoadedModel, tmp_path: Path) -> None:
    """The first picture waits for the routing grid and the tuner only; every other tab is built when selected
    (from the live state of that moment, equal to a view built up front), and the export builds the rest."""
    dash = Workbench(loaded, prompt="hello experts", background=False)
    assert set(dash._built) == {"Routing", "Live tuner"}
    pending = [c for c in dash.tabs.children if not isinstance(c, (RoutingExplorer, LiveTuner))]
    assert len(pending) == len(dash._factories) - 2 and all("building" in c.value for c in pending)
    titles = list(dash._factories)
    dash.tuner.top_k.value = 2
    dash.tabs.selected_index = titles.index("KV compression")
    kv = dash.tabs.children[titles.index("KV compression")]
    assert isinstance(kv, KVCompression) and dash.kv is kv and kv._shown
    assert dash.tabs.selected_index == titles.index("KV compression")  # swapping the child kept the selection
    upfront = KVCompression(live=dash.live)  # the same view built now, eagerly: the same picture
    assert kv.error.value == upfront.error.value
    assert "FP8 error" not in dash._built
    dash.save_html(tmp_path / "all.html")
    assert set(dash._built) == set(titles) and not any("building" in getattr(c, "value", "") for c in dash.tabs.children)
    assert dash.tabs.selected_index == titles.index("KV compression") and not dash.fp8._shown
