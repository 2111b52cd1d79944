"""The interpreter fixes that the kernel tests rely on (see workbench_kernels._interpret)."""

from __future__ import annotations

import pytest
import torch
import triton

from workbench_kernels import _interpret

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter fixes are for CPU runs")


def test_fixes_hold_on_installed_triton() -> None:
    # Fails when a Triton upgrade moves or changes the patched primitives (the patch then no longer applies).
    assert _interpret.verify() == []


def test_triton_version_was_checked() -> None:
    # The fixes read interpreter internals; a new Triton needs `verify()` re-run and the list extended.
    assert triton.__version__ in _interpret.CHECKED_TRITON_VERSIONS, (
        f"triton {triton.__version__} not in {_interpret.CHECKED_TRITON_VERSIONS}: re-check _interpret.py"
    )
