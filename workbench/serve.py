"""Serve the dashboard as a standalone Panel app on 127.0.0.1 (workbench serve --model M --trace STORE --port P).

This module only parses arguments; Panel and the views are imported when the command runs, so the other
`workbench` subcommands stay fast to start.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a preset name, or a checkpoint directory")
    p.add_argument("--trace", default=None, help="a trace store recorded with this model (optional)")
    p.add_argument("--prompt", default=None, help="the live session's text")
    p.add_argument("--port", type=int, default=5006, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--show", action="store_true", help="open a browser tab")


def run(args: argparse.Namespace) -> int:
    from workbench.widgets.app import serve

    serve(args.model, args.trace, args.prompt, args.port, args.show)
    return 0
