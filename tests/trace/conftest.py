"""Shared fixtures: the bundled V3-style model, loaded once (the trace tests of schema 1.1; V4 stores, schema 1.2,
have their own tests in test_v4_trace.py)."""

from __future__ import annotations

import pytest

from workbench.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model("default-v3")
