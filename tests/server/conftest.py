"""Fixtures for the REST API tests: the extension enabled, and one real trace store written once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workbench.cli import main as workbench_cli


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"workbench.server": True}}}


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """A store written by `workbench trace` from the fixed-shape `tiny-random` model (3 layers, MoE layers 1-2,
    16 experts, top-4), so shapes do not move when the bundled default model is retrained. Tests copy it
    (`copy_store`) instead of tracing again: tracing is most of what a test would otherwise cost."""
    corpus = tmp_path_factory.mktemp("input") / "in.txt"
    corpus.write_text("def f(x):\n    return x + 1\nthe expert routes a token\n")
    out = tmp_path_factory.mktemp("template") / "t.zarr"
    assert workbench_cli(["trace", "--model", "tiny-random", "--input", str(corpus), "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy_store(store_template):
    """copy_store(dest) -> dest: a fresh copy of the template store at `dest` (parents created)."""

    def copy(dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(store_template, dest)
        return dest

    return copy
