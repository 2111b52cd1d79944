"""The `workbench` command. Each subcommand lives beside the component it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "demo": "workbench.demo",
    "trace": "workbench.trace.command",
    "trace-status": "workbench.trace.status",
    "import-routing": "workbench.trace.import_command",
    "train": "workbench.training.command",
    "serve": "workbench.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="MoE Workbench for DeepSeek-style models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except (ValueError, FileNotFoundError, KeyError) as e:  # user errors: one clear line, no traceback
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
