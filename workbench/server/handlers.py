"""REST handlers under /workbench/api/: list trace stores, summarise one, create a notebook (analysis, workbench, live).

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

from workbench.server.discovery import PathRefusedError, find_stores, resolve_inside, store_attrs, summarize
from workbench.server.notebooks import FOLDER_KINDS, KINDS, STORE_KINDS, create_notebook


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


class BadRequestError(ValueError):
    """A request body that is not what the endpoint takes; the message says which field and why."""


class NotebookHandler(_Base):
    """POST {"kind": "analysis" | "workbench", "store": STORE} or {"kind": "live", "dir": DIR} -> 201 {"path"}."""

    @tornado.web.authenticated
    def post(self) -> None:
        try:
            body = self._body()
            kind = body.get("kind", "analysis")
            if kind in STORE_KINDS:
                store = self._store(body)
                path = create_notebook(kind, store=store)
            elif kind in FOLDER_KINDS:
                folder = resolve_inside(self.root, self._text(body, "dir", default=""))
                if not folder.is_dir():
                    raise FileNotFoundError(f"{body.get('dir')!r} is not a folder under the server root")
                path = create_notebook(kind, folder=folder)
            else:
                raise BadRequestError(f"unknown notebook kind {kind!r}; known: {list(KINDS)}")
        except PathRefusedError as e:
            self.fail(403, str(e))
        except BadRequestError as e:
            self.fail(400, f"bad request: {e}")
        except FileNotFoundError as e:
            self.fail(404, str(e))
        except FileExistsError as e:
            self.fail(409, str(e))
        except PermissionError as e:
            self.fail(403, f"cannot write the notebook: {e.strerror}: {e.filename}")
        except ValueError as e:  # store metadata that is not JSON
            self.fail(422, f"cannot read trace store: {e}")
        else:
            self.set_status(201)
            self.reply({"path": path.relative_to(self.root.resolve()).as_posix(), "kind": kind})

    def _body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise BadRequestError(f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequestError(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    @staticmethod
    def _text(body: dict[str, Any], field: str, default: str | None = None) -> str:
        value = body.get(field, default)
        if not isinstance(value, str):
            raise BadRequestError(f"{field!r} must be a path string, got {value!r}")
        return value

    def _store(self, body: dict[str, Any]) -> Path:
        if "store" not in body:
            raise BadRequestError(f"a {body.get('kind', 'analysis')!r} notebook needs 'store', the path of a trace store")
        relative = self._text(body, "store")
        store = resolve_inside(self.root, relative)
        if store_attrs(store) is None:
            raise FileNotFoundError(f"{relative!r} is not a trace store")
        return store


def setup_handlers(web_app: Any) -> None:
    base = url_path_join(web_app.settings["base_url"], "workbench", "api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "traces"), StoresHandler),
        (url_path_join(base, "traces", "summary"), SummaryHandler),
        (url_path_join(base, "notebooks"), NotebookHandler),
    ])
