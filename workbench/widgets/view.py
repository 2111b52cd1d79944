"""What every view shares: it is an ipywidgets VBox (display it as a cell's last expression), it can be built
alone from a model name or on a dashboard's shared live session, and it exports itself as static HTML."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import xarray as xr

from workbench.loader import LoadedModel, load_model
from workbench.widgets.html_export import save_html
from workbench.widgets.live import LiveSession
from workbench.widgets.trace_source import check_trace_matches, load_trace

ModelArg = str | Path | LoadedModel


def resolve_model(model: ModelArg) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def resolve_live(model: ModelArg | None, prompt: str | None, live: LiveSession | None) -> LiveSession:
    """The dashboard's session when given, else a new one on `model` (default: the bundled model)."""
    if live is not None:
        if model is not None or prompt is not None:
            raise ValueError("pass either live= (a shared session) or model=/prompt=, not both")
        return live
    return LiveSession(resolve_model(model if model is not None else "default"), prompt)


def resolve_sources(model: ModelArg | None, trace: str | Path | xr.Dataset | None, prompt: str | None,
                    live: LiveSession | None) -> tuple[LiveSession | None, dict[str, xr.Dataset]]:
    """The live session and stored traces a trace-reading view shows: live unless only a trace is given; a trace
    must come from the live model when both are shown, and must hold routing when it stands alone."""
    session = resolve_live(model, prompt, live) if (live is not None or model is not None or trace is None) else None
    traces: dict[str, xr.Dataset] = {}
    if trace is not None:
        ds = load_trace(trace)
        if session is not None:
            check_trace_matches(ds, session.loaded)
        elif "expert_ids" not in ds:
            raise ValueError("trace: the trace has no expert_ids (routing was not recorded)")
        traces["trace"] = ds
    return session, traces


def heading(text: str, note: str = "") -> widgets.HTML:
    extra = f' <span style="color:#666;font-weight:normal;font-size:12px">{note}</span>' if note else ""
    return widgets.HTML(f'<h3 style="margin:4px 0">{text}{extra}</h3>')


class View(widgets.VBox):
    title = "view"
    _shown = True  # on screen; the dashboard clears it for the tabs not selected

    def when_shown(self, fn: Callable[[], None]) -> Callable[..., None]:
        """A live-session listener that runs `fn` now while this view is on screen, else once when it next is
        (`set_shown`): a hidden dashboard tab does not pay a probed forward for every control change."""

        def listener(*_: Any) -> None:
            if self._shown:
                fn()
            else:
                self.__dict__.setdefault("_deferred", {})[listener] = fn  # one pending run per listener, in order

        return listener

    def set_shown(self, shown: bool) -> None:
        """Mark the view as on screen (or not); coming on screen runs the refreshes it skipped while hidden."""
        self._shown = shown
        if shown:
            deferred = self.__dict__.pop("_deferred", {})
            for fn in deferred.values():
                fn()

    def save_html(self, path: str | Path) -> Path:
        """A static, self-contained HTML page of what the view shows now (no kernel, no network needed)."""
        return save_html(self, path, title=f"MoE Workbench: {self.title}")
