"""The jupyter_server extension: REST endpoints under /workbench/api/ for the lab front end."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "workbench.server"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from workbench.server.handlers import setup_handlers

    setup_handlers(server_app.web_app)
    server_app.log.info("workbench: REST API at /workbench/api/")
