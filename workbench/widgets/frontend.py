"""Front-end modules: one ESM file per dense view in `static/`, after the helpers every view shares (`common.js`)
and before the bridge of the host that runs it.

Each view module defines `draw(el, api)` against a three-method api (get / set / on), so the same drawing code runs
as an anywidget in a notebook, as a Panel `JSComponent` under `workbench serve`, and inside a static HTML export.
(Panel's own `AnyWidgetComponent` would run the anywidget module as is, but it is a React component whose React
comes from esm.sh, a CDN: nothing here may load from the network, so Panel gets the plain-ESM bridge instead.)
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

Host = Literal["anywidget", "panel", "static"]
HOSTS: tuple[Host, ...] = ("anywidget", "panel", "static")


def _static(name: str) -> str:
    return resources.files("workbench.widgets").joinpath("static", name).read_text(encoding="utf-8")


def esm_source(view: str, host: Host) -> str:
    """The module for `view` (a file static/<view>.js defining `draw`) wired to `host`'s model api."""
    if host not in HOSTS:
        raise ValueError(f"unknown front-end host {host!r}; known: {list(HOSTS)}")
    try:
        body = _static(f"{view}.js")
    except FileNotFoundError:
        raise ValueError(f"no front-end module static/{view}.js") from None
    prelude = f"const WB_ESM_NAME = {view!r};\n" if host == "static" else ""
    return f"{prelude}{_static('common.js')}\n{body}\n{_static(f'bridge_{host}.js')}"
