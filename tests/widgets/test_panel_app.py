"""The Panel mirror behind `workbench serve`: Panel widgets drive the same views (and so the same session), view
outputs follow into Panel panes, and the ESM view becomes a JSComponent running the same drawing code."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import ipywidgets as widgets
import panel as pn
import pytest

from workbench.controls import Controls, RoutingControl
from workbench.loader import LoadedModel
from workbench.widgets import LiveTuner, RoutingExplorer
from workbench.widgets.app import MirrorError, mirror
from workbench.widgets.frontend import esm_source
from workbench.widgets.live import LiveSession


def _find(obj: object, kind: type, name: str | None = None) -> list:  # type: ignore[type-arg]
    found = []
    for o in pn.Column(obj).select(kind):
        if name is None or getattr(o, "label", None) == name:
            found.append(o)
    return found


def test_panel_controls_drive_the_session(live: LiveSession) -> None:
    tuner = LiveTuner(live=live)
    app = mirror(tuner)
    (top_k,) = _find(app, pn.widgets.IntSlider, "top-k")
    top_k.value = 2
    assert tuner.top_k.value == 2 and live.result.controls == Controls(routing={"all": RoutingControl(top_k=2)})
    (ablate,) = _find(app, pn.widgets.MultiSelect, "ablate")
    ablate.value = [3]
    assert tuner.ablate.value == (3,)
    report = [p for p in _find(app, pn.pane.HTML) if "wb-tuner-report" in p.object]
    assert report and f'data-generation="{live.result.generation}"' in report[0].object
    tuner.top_k.value = 4  # and back: the Panel widget follows the ipywidget
    assert top_k.value == 4
    (temp,) = _find(app, pn.widgets.FloatSlider, "temperature")  # log slider: Panel slides the exponent
    temp.value = -0.3
    assert tuner.temperature.value == pytest.approx(10**-0.3)


def test_grid_becomes_a_jscomponent_with_the_same_esm(live: LiveSession) -> None:
    view = RoutingExplorer(live=live)
    app = mirror(view)
    (grid,) = list(pn.Column(app).select(pn.custom.JSComponent))
    assert grid.data == view.grid.data and grid.selected == -1
    assert "function draw(el, api)" in grid._esm and grid._esm == esm_source("routing_grid", "panel")
    grid.selected = 3  # a click in the served page
    assert view.grid.selected == 3
    live.update(routing={"all": RoutingControl(top_k=1)})
    assert grid.data["top_k"] == 1


def test_unknown_widgets_are_named() -> None:
    with pytest.raises(MirrorError, match="does not know ColorPicker"):
        mirror(widgets.ColorPicker(description="c"))


def test_esm_hosts_share_the_drawing_code() -> None:
    sources = {h: esm_source("routing_grid", h) for h in ("anywidget", "panel", "static")}  # type: ignore[arg-type]
    core = (files("workbench.widgets") / "static" / "routing_grid.js").read_text()
    common = (files("workbench.widgets") / "static" / "common.js").read_text()
    assert all(core in s and common in s for s in sources.values())
    assert "export default" in sources["anywidget"] and "export function render" in sources["panel"]
    with pytest.raises(ValueError, match="no front-end module static/nope.js"):
        esm_source("nope", "panel")
    with pytest.raises(ValueError, match="unknown front-end host"):
        esm_source("routing_grid", "vscode")  # type: ignore[arg-type]


def test_serve_command_checks_its_port_before_building_anything(capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--port", "0", "--trace", "t.zarr"])
    assert (args.port, args.trace, args.model) == (0, "t.zarr", "default")
    assert main(["serve", "--port", "70000"]) == 2
    assert "port 70000 is not a TCP port" in capsys.readouterr().err


def test_whole_dashboard_mirrors_with_a_store(tmp_path: Path, loaded: LoadedModel) -> None:
    from tests.trace.trace_helpers import corpus, write_store
    from workbench.widgets.app import build_app

    store = tmp_path / "c.zarr"
    write_store(store, loaded, corpus(6), chunk_tokens=16)
    wb, app = build_app(loaded, trace=str(store), prompt="hi there")
    (grid,) = list(app.select(pn.custom.JSComponent))
    assert grid.data["source"] == "trace" and grid.data == wb.routing.grid.data
    routing_source = next(w for w in app.select(pn.widgets.RadioButtonGroup) if w.label == "source")
    routing_source.value = "live"
    assert wb.routing.source == "live" and grid.data["n_total"] == len("hi there") + 1
    (tabs, *_) = list(app.select(pn.Tabs))
    assert tabs._names == ["Routing", "Specialisation", "KV compression", "FP8 error", "Live tuner", "Sparse attention",
                           "mHC"]
