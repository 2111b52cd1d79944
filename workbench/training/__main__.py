"""`python -m workbench.training --out DIR`: the same as `workbench train --out DIR`."""

from __future__ import annotations

import argparse
import sys

from workbench.training import command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.training", description=command.__doc__)
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
