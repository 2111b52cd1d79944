"""Shared fixtures: the tiny default model, loaded once."""

from __future__ import annotations

import pytest

from workbench.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model("default")
