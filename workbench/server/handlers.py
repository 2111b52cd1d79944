"""REST handlers under /workbench/api/: list trace stores, summarise one, create a notebook (analysis, workbench, live).

Every handler requires Jupyter's authentication; paths are resolved inside the server root (see discovery.py).
Nothing here runs code; the only write is the notebook the user asked for, never over an existing file.

The disk work (walking folders, opening stores, reading expert ids, writing a notebook) runs on a small thread pool,
never on the event loop, so one slow listing does not stall the rest of Jupyter; each request has a time budget
(LISTING_BUDGET_S, SUMMARY_TIMEOUT_S) and says when it ran out. Errors are `{"error": message}` with the codes of
the docs' table (`_CODES`); messages quote paths shortened, and long URIs are cut before the access log sees them.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from workbench.server.discovery import (
    MAX_MESSAGE_CHARS,
    BadPathError,
    PathRefusedError,
    StoreUnreadableError,
    cut,
    find_stores,
    notebook_store,
    resolve_folder,
    shown,
    summarize,
)
from workbench.server.notebooks import FOLDER_KINDS, KINDS, STORE_KINDS, create_notebook

LISTING_BUDGET_S = 10.0  # a listing stops walking after this long and says so (`truncated`, an error entry)
LISTING_GRACE_S = 5.0  # ... plus the store it was opening; past both, the reply is 503
SUMMARY_TIMEOUT_S = 30.0  # a summary, or the store check and write of a notebook, past this is answered 503
MAX_LOGGED_URI = 300  # characters of a request URI the access log gets
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="workbench-api")  # every request's disk work

T = TypeVar("T")


class BadRequestError(ValueError):
    """A request that is not what the endpoint takes; the message says which field and why."""


class OverBudgetError(Exception):
    """Work that did not finish within its request's time budget (503); it may still finish in the background."""


_CODES: tuple[tuple[type[BaseException], int, str], ...] = (  # the docs' error table, most specific first
    (BadRequestError, 400, "bad request: "),
    (BadPathError, 400, "bad request: "),
    (PathRefusedError, 403, ""),
    (PermissionError, 403, "permission denied: "),
    (FileNotFoundError, 404, ""),
    (NotADirectoryError, 404, ""),
    (FileExistsError, 409, ""),
    (StoreUnreadableError, 422, "cannot read trace store: "),
    (OverBudgetError, 503, ""),
)


async def offload(work: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run `work` on the pool and wait at most `timeout` seconds (queueing included) without blocking the loop."""
    future = asyncio.get_running_loop().run_in_executor(_POOL, work)
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise OverBudgetError(f"{what} did not finish within {timeout:g} s (the server's time budget); the disk may "
                              "be slow or the server busy, try again") from None


class _Base(APIHandler):
    @property
    def root(self) -> Path:
        return Path(self.settings["server_root_dir"]).expanduser()

    async def prepare(self) -> None:  # type: ignore[override]  # (as jupyter_server's own APIHandler)
        # jupyter_server logs the URI of every failed request: a 5,000-character path must not land there whole
        if len(self.request.uri or "") > MAX_LOGGED_URI:
            self.request.uri = f"{self.request.uri[:MAX_LOGGED_URI]}... ({len(self.request.uri):,} characters)"
        await super().prepare()

    async def answer(self, work: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> None:
        """Reply with what `work` returns, (status, payload), or with the documented error for what it raised."""
        try:
            status, payload = await work()
        except tuple(cls for cls, _, _ in _CODES) as e:
            status, prefix = next((code, prefix) for cls, code, prefix in _CODES if isinstance(e, cls))
            detail = e.strerror if isinstance(e, PermissionError) and e.strerror else str(e)
            self.set_status(status)
            self.finish(json.dumps({"error": cut(prefix + detail, MAX_MESSAGE_CHARS)}))
        else:
            self.set_status(status)
            self.finish(json.dumps(payload))

    def path_argument(self, name: str, *, needed_by: str | None = None) -> str:
        """The query argument `name` as sent: tornado's get_argument would turn control characters into spaces,
        and so quietly answer about another path. Missing: "" unless `needed_by` names who needs it (400)."""
        values = self.request.query_arguments.get(name)
        if not values:
            if needed_by is not None:
                raise BadRequestError(f"{needed_by} needs {name!r}, the path of a trace store under the server root")
            return ""
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"{name!r} is not UTF-8") from None


class StoresHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self._listing)

    async def _listing(self) -> tuple[int, dict[str, Any]]:
        under, budget = self.path_argument("path"), LISTING_BUDGET_S
        listing = await offload(functools.partial(find_stores, self.root, under, budget),
                                timeout=budget + LISTING_GRACE_S, what="the listing")
        return 200, listing


class SummaryHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self._summary)

    async def _summary(self) -> tuple[int, dict[str, Any]]:
        relative = self.path_argument("path", needed_by="the summary")
        summary = await offload(functools.partial(summarize, self.root, relative),
                                timeout=SUMMARY_TIMEOUT_S, what=f"the summary of {shown(relative)}")
        return 200, summary


class NotebookHandler(_Base):
    """POST {"kind": "analysis" | "workbench", "store": STORE} or {"kind": "live", "dir": DIR} -> 201 {"path"}."""

    @tornado.web.authenticated
    async def post(self) -> None:
        await self.answer(self._notebook)

    async def _notebook(self) -> tuple[int, dict[str, Any]]:
        body = await offload(self._body, timeout=SUMMARY_TIMEOUT_S, what="reading the request")
        kind = body.get("kind", "analysis")
        if kind in STORE_KINDS:
            relative = self._store(body)
            # the store is judged as the summary judges it; the write is separate, so a check that runs out of
            # time writes nothing
            store = await offload(functools.partial(notebook_store, self.root, relative),
                                  timeout=SUMMARY_TIMEOUT_S, what=f"checking the store {shown(relative)}")
            write = functools.partial(create_notebook, kind, store=store, root=self.root)
        elif kind in FOLDER_KINDS:
            folder = await offload(functools.partial(resolve_folder, self.root, self._text(body, "dir", default="")),
                                   timeout=SUMMARY_TIMEOUT_S, what="checking the folder")
            write = functools.partial(create_notebook, kind, folder=folder, root=self.root)
        else:
            raise BadRequestError(f"unknown notebook kind {shown(str(kind))}; known: {list(KINDS)}")
        path = await offload(write, timeout=SUMMARY_TIMEOUT_S, what="writing the notebook")
        return 201, {"path": path.relative_to(self.root.resolve()).as_posix(), "kind": kind}

    def _body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except RecursionError:
            raise BadRequestError("the body is not JSON (nested too deeply)") from None
        except ValueError as e:
            raise BadRequestError(f"the body is not JSON ({cut(str(e))})") from None
        if not isinstance(body, dict):
            raise BadRequestError(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    @staticmethod
    def _text(body: dict[str, Any], field: str, default: str | None = None) -> str:
        value = body.get(field, default)
        if not isinstance(value, str):
            raise BadRequestError(f"{field!r} must be a path string, got {cut(repr(value))}")
        return value

    def _store(self, body: dict[str, Any]) -> str:
        if "store" not in body:
            raise BadRequestError(f"a {body.get('kind', 'analysis')!r} notebook needs 'store', the path of a trace store")
        return self._text(body, "store")


def setup_handlers(web_app: Any) -> None:
    base = url_path_join(web_app.settings["base_url"], "workbench", "api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "traces"), StoresHandler),
        (url_path_join(base, "traces", "summary"), SummaryHandler),
        (url_path_join(base, "notebooks"), NotebookHandler),
    ])
