"""The README and docs/ describe the code as it is: every backend kind, every control field and short form, every
CLI subcommand and flag, and every name of the front door appear in them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

import workbench
from workbench.cli import SUBCOMMANDS, build_parser
from workbench.controls import AttentionControl, Controls, LatentControl, RoutingControl
from workbench.model.dispatch import BACKENDS, KINDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_kind_is_documented(kind: str) -> None:
    assert f'"{kind}"' in DOCS or f"`{kind}`" in DOCS, f"backend kind {kind!r} is not in README.md or docs/"


def test_every_backend_value_is_documented() -> None:
    for value in BACKENDS:
        assert f'"{value}"' in DOCS, value


@pytest.mark.parametrize("cls", [Controls, RoutingControl, LatentControl, AttentionControl])
def test_every_control_field_is_documented(cls: type) -> None:
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in DOCS and f"{f.name}=" not in DOCS]
    assert missing == [], f"{cls.__name__} fields missing from README.md / docs/: {missing}"


def test_every_short_form_is_documented() -> None:
    for name in ("ablate", "force", "top_k", "bias", "latent_rank", "replay"):
        assert f"Controls.{name}(" in DOCS, name


def test_every_cli_subcommand_and_flag_is_documented() -> None:
    parsers = _subcommand_parsers()
    assert sorted(parsers) == sorted(SUBCOMMANDS)
    missing = []
    for name, parser in parsers.items():
        if f"workbench {name}" not in DOCS:
            missing.append(f"workbench {name}")
        for action in parser._actions:
            missing += [f"{name} {flag}" for flag in action.option_strings
                        if flag.startswith("--") and flag != "--help" and flag not in DOCS]
    assert missing == [], f"not in README.md / docs/: {missing}"


def test_every_front_door_name_is_in_the_readme() -> None:
    missing = [n for n in workbench.__all__ if n != "__version__" and f"wb.{n}" not in README]
    assert missing == [], f"README.md does not show: {missing}"
