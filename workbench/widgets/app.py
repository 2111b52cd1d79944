"""`workbench serve`: the dashboard as a standalone Panel app on loopback.

The app is not a second implementation of the views. It builds the same `Workbench` (ipywidgets objects live happily
without a notebook front end) and mirrors its widget tree into Panel: each control becomes the matching Panel
widget, linked both ways to the ipywidget, each HTML output a Panel HTML pane that follows it, and each ESM view a
Panel `JSComponent` running the same static/*.js drawing code through the Panel bridge. So every behaviour and every
test of the views holds here too, and `panel serve`'s Bokeh server ships its own JS/CSS: no CDN, nothing leaves
the machine.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import panel as pn
import param
import traitlets
import xarray as xr

from workbench.widgets.dashboard import Workbench
from workbench.widgets.frontend import esm_source
from workbench.widgets.trace_source import load_trace
from workbench.widgets.view import ModelArg, resolve_model

_TRAIT_PARAMS: dict[type, Callable[[Any], param.Parameter]] = {
    traitlets.Dict: lambda v: param.Dict(default=dict(v)),
    traitlets.Int: lambda v: param.Integer(default=int(v)),
    traitlets.Float: lambda v: param.Number(default=float(v)),
    traitlets.Unicode: lambda v: param.String(default=str(v)),
    traitlets.Bool: lambda v: param.Boolean(default=bool(v)),
    traitlets.List: lambda v: param.List(default=list(v)),
}
_COMPONENTS: dict[str, type] = {}


class MirrorError(TypeError):
    """A widget type the Panel mirror does not know (a view grew a widget without teaching the mirror)."""


def _link(ipy: widgets.Widget, name: str, pw: Any, pname: str = "value",
          to_panel: Callable[[Any], Any] = lambda v: v, to_ipy: Callable[[Any], Any] = lambda v: v) -> None:
    """Keep ipy.<name> and pw.<pname> equal; the converters map between the two representations."""

    def push(change: dict[str, Any]) -> None:
        value = to_panel(change["new"])
        if getattr(pw, pname) != value:
            setattr(pw, pname, value)

    def pull(event: Any) -> None:
        value = to_ipy(event.new)
        if getattr(ipy, name) != value:
            setattr(ipy, name, value)

    ipy.observe(push, names=name)
    pw.param.watch(pull, pname)


def _options(w: Any) -> dict[str, Any]:
    return dict(zip(w._options_labels, w._options_values, strict=True))


def _component_class(w: widgets.Widget) -> type:
    """A JSComponent class with one parameter per synced trait of the anywidget `w`, running its ESM."""
    name = w.esm_name
    if name not in _COMPONENTS:
        params: dict[str, Any] = {}
        for trait_name in _synced_traits(w):
            trait = w.traits()[trait_name]
            make = next((f for t, f in _TRAIT_PARAMS.items() if isinstance(trait, t)), None)
            if make is None:
                raise MirrorError(f"{type(w).__name__}.{trait_name}: no Panel parameter for {type(trait).__name__}")
            params[trait_name] = make(getattr(w, trait_name))
        params["_esm"] = esm_source(name, "panel")
        _COMPONENTS[name] = type(f"{type(w).__name__}Component", (pn.custom.JSComponent,), params)
    return _COMPONENTS[name]


def _synced_traits(w: widgets.Widget) -> list[str]:
    base = set(widgets.DOMWidget.class_trait_names(sync=True))
    return [n for n in w.trait_names(sync=True) if not n.startswith("_") and n not in base]


def mirror(w: widgets.Widget) -> Any:
    """The Panel counterpart of ipywidget `w` (recursively for boxes and tabs), linked to it."""
    if getattr(w, "esm_name", None) is not None:
        comp = _component_class(w)(**{n: getattr(w, n) for n in _synced_traits(w)})
        for n in _synced_traits(w):
            _link(w, n, comp, n)
        return comp
    if isinstance(w, widgets.Tab):
        return pn.Tabs(*[(str(w.get_title(i) or i), mirror(c)) for i, c in enumerate(w.children)], dynamic=False)
    if isinstance(w, widgets.HBox):
        return pn.Row(*[mirror(c) for c in w.children])
    if isinstance(w, widgets.Box):
        return pn.Column(*[mirror(c) for c in w.children])
    if isinstance(w, widgets.HTML):
        pane = pn.pane.HTML(w.value, sizing_mode="stretch_width")
        _link(w, "value", pane, "object")
        return pane
    if isinstance(w, widgets.Label):
        pane = pn.pane.HTML(html.escape(w.value))
        _link(w, "value", pane, "object", to_panel=html.escape)
        return pane
    if isinstance(w, widgets.Button):
        button = pn.widgets.Button(label=w.description)
        button.on_click(lambda _: w.click())
        return button
    return _mirror_control(w)


def _mirror_control(w: widgets.Widget) -> Any:
    label = getattr(w, "description", "")
    pw: Any
    if isinstance(w, widgets.FloatLogSlider):  # Panel has no log slider: slide the exponent
        pw = pn.widgets.FloatSlider(label=label, start=w.min, end=w.max, step=w.step, value=math.log(w.value, w.base))
        _link(w, "value", pw, to_panel=lambda v: math.log(v, w.base), to_ipy=lambda x: float(w.base**x))
        return pw
    if isinstance(w, widgets.IntSlider):
        pw = pn.widgets.IntSlider(label=label, start=w.min, end=max(w.max, w.min + 1), step=w.step, value=w.value,
                                  disabled=w.disabled)
        _link(w, "max", pw, "end", to_panel=lambda v: max(v, w.min + 1))
    elif isinstance(w, widgets.FloatSlider):
        pw = pn.widgets.FloatSlider(label=label, start=w.min, end=w.max, step=w.step, value=w.value)
    elif isinstance(w, widgets.BoundedIntText):
        pw = pn.widgets.IntInput(label=label, start=w.min, end=w.max, value=w.value)
    elif isinstance(w, widgets.Textarea):
        pw = pn.widgets.TextAreaInput(label=label, value=w.value)
    elif isinstance(w, widgets.Text):
        pw = pn.widgets.TextInput(label=label, value=w.value, placeholder=w.placeholder)
    elif isinstance(w, widgets.Checkbox):
        pw = pn.widgets.Checkbox(label=label, value=w.value, disabled=w.disabled)
    elif isinstance(w, widgets.SelectMultiple):
        pw = pn.widgets.MultiSelect(label=label, options=_options(w), value=list(w.value), size=w.rows or 4)
        _link(w, "value", pw, to_panel=list, to_ipy=tuple)
        return pw
    elif isinstance(w, widgets.ToggleButtons):
        pw = pn.widgets.RadioButtonGroup(label=label, options=_options(w), value=w.value)
        _link(w, "options", pw, "options", to_panel=lambda _: _options(w))
    elif isinstance(w, widgets.Dropdown):
        pw = pn.widgets.Select(label=label, options=_options(w), value=w.value)
        _link(w, "options", pw, "options", to_panel=lambda _: _options(w))
    else:
        raise MirrorError(f"the Panel mirror does not know {type(w).__name__} ({label!r})")
    _link(w, "value", pw)
    return pw


def build_app(model: ModelArg = "default", trace: str | Path | xr.Dataset | None = None,
              prompt: str | None = None) -> tuple[Workbench, Any]:
    """The dashboard and its Panel mirror."""
    wb = Workbench(model, trace=trace, prompt=prompt)
    wb.build_all()  # the mirror is a static copy of the widget tree, taken once: every tab must exist now
    return wb, pn.Column(mirror(wb), sizing_mode="stretch_width")


def serve(model: str = "default", trace: str | None = None, prompt: str | None = None, port: int = 5006,
          show: bool = False) -> None:
    """Serve the dashboard on 127.0.0.1:`port` (0: a free port) until interrupted.

    The model and the trace are loaded once; every browser tab gets its own dashboard (its own prompt, controls
    and views) on them, so one visitor's slider never moves another's page. Runs of the shared model take its
    `model_lock`, one at a time. The first dashboard is built before the server starts, so a bad model, trace or
    prompt fails here with its message instead of in the browser.
    """
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    if port == 0:
        from workbench.demo import free_port

        port = free_port()
    pn.extension()
    loaded = resolve_model(model)
    ds = load_trace(trace) if trace is not None else None
    first: list[Any] = [build_app(loaded, ds, prompt)[1]]  # checked now; handed to the first tab that opens

    def per_tab() -> Any:
        return first.pop() if first else build_app(loaded, ds, prompt)[1]

    server = pn.serve(per_tab, address="127.0.0.1", port=port, show=show, start=False, title="MoE Workbench",
                      websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"])
    print(f"workbench serve: http://127.0.0.1:{port}/", flush=True)
    server.start()
    server.io_loop.start()
