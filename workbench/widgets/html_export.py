"""Static, self-contained HTML export of a view: what it shows now, readable with no kernel and no network.

ipywidgets' own embedding (`embed_minimal_html`) loads its widget manager from a CDN, which an offline reader cannot
fetch, so the export walks the widget tree instead: HTML widgets keep their markup, controls become a line stating
their value, tabs become sections, and each ESM view is inlined with its state frozen into the page (it stays
interactive: hover and click work, nothing calls home). Every script and style is inline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from workbench.widgets.frontend import esm_source

PAGE_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
.wb-export-section { border-top: 1px solid #ccc; margin-top: 12px; padding-top: 6px; }
.wb-export-control { color: #555; margin: 2px 0; }
"""


def _script_json(value: Any) -> str:
    return json.dumps(value, allow_nan=False).replace("</", "<\\/")


class _Exporter:
    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.modules: dict[str, str] = {}

    def render(self, w: widgets.Widget) -> str:
        esm_name = getattr(w, "esm_name", None)
        if esm_name is not None:
            view_id = f"v{len(self.states)}"
            self.states[view_id] = {name: getattr(w, name) for name in w.keys if not name.startswith("_")
                                    and name not in ("comm", "layout", "tabbable", "tooltip", "keys", "log")}
            self.modules.setdefault(esm_name, esm_source(esm_name, "static"))
            return f'<div data-wb-esm="{html.escape(esm_name)}" data-wb-view="{view_id}"></div>'
        if isinstance(w, widgets.Tab):
            return "".join(f'<section class="wb-export-section"><h3>{html.escape(str(w.get_title(i) or ""))}</h3>'
                           f"{self.render(child)}</section>" for i, child in enumerate(w.children))
        if isinstance(w, widgets.Box):
            return "<div>" + "".join(self.render(c) for c in w.children) + "</div>"
        if isinstance(w, widgets.HTML):
            return f"<div>{w.value}</div>"
        if isinstance(w, widgets.Label):
            return f"<div>{html.escape(str(w.value))}</div>"
        if isinstance(w, widgets.Button):
            return ""
        if hasattr(w, "value"):
            label = getattr(w, "description", "") or type(w).__name__
            value = w.value
            shown = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            return f'<div class="wb-export-control">{html.escape(label)}: <b>{html.escape(shown)}</b></div>'
        return ""


def export_html(widget: widgets.Widget, title: str) -> str:
    """The page as a string (see the module docstring)."""
    ex = _Exporter()
    body = ex.render(widget)
    scripts = [f"<script>window.__WB_STATE__ = {_script_json(ex.states)};</script>"]
    scripts += [f'<script type="module">\n{src}\n</script>' for src in ex.modules.values()]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>\n"
            f"<body><h2>{html.escape(title)}</h2>\n{body}\n" + "\n".join(scripts) + "\n</body></html>\n")


def save_html(widget: widgets.Widget, path: str | Path, title: str) -> Path:
    """Write `export_html` to `path` (its folder must exist) and return the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    path.write_text(export_html(widget, title), encoding="utf-8")
    return path
