"""REST handlers under /workbench/api/: list trace stores, summarise one, create an analysis notebook.

Every handler requires Jupyter's authentication; paths are resolved inside the server root (see discovery.py).
Nothing here runs code; the only write is the notebook the user asked for, never over an existing file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from workbench.server.discovery import PathRefusedError, find_stores, resolve_inside, summarize
from workbench.server.notebooks import create_notebook


class _Base(APIHandler):
    @property
    def root(self) -> Path:
        return Path(self.settings["server_root_dir"]).expanduser()

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"error": message}))

    def reply(self, payload: dict[str, Any]) -> None:
        self.finish(json.dumps(payload))


class StoresHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        try:
            self.reply(find_stores(self.root, self.get_argument("path", "")))
        except PathRefusedError as e:
            self.fail(403, str(e))
        except FileNotFoundError as e:
            self.fail(404, str(e))


class SummaryHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        try:
            self.reply(summarize(self.root, self.get_argument("path")))
        except PathRefusedError as e:
            self.fail(403, str(e))
        except FileNotFoundError as e:
            self.fail(404, str(e))
        except Exception as e:  # a corrupt store: report it, do not 500 the UI
            self.fail(422, f"cannot read trace store: {type(e).__name__}: {e}")


class NotebookHandler(_Base):
    @tornado.web.authenticated
    def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            store = resolve_inside(self.root, str(body["store"]))
            kind = str(body.get("kind", "analysis"))
        except (ValueError, KeyError) as e:
            self.fail(403 if isinstance(e, PathRefusedError) else 400, f"bad request: {e}")
            return
        if not (store / "zarr.json").is_file():
            self.fail(404, f"{body['store']!r} is not a trace store")
            return
        try:
            path = create_notebook(store, kind)
        except ValueError as e:
            self.fail(400, str(e))
            return
        self.set_status(201)
        self.reply({"path": path.relative_to(self.root.resolve()).as_posix()})


def setup_handlers(web_app: Any) -> None:
    base = url_path_join(web_app.settings["base_url"], "workbench", "api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "traces"), StoresHandler),
        (url_path_join(base, "traces", "summary"), SummaryHandler),
        (url_path_join(base, "notebooks"), NotebookHandler),
    ])
