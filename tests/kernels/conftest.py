"""Test setup for the Triton kernels: run them in Triton's CPU interpreter, with its numeric bugs fixed.

`TRITON_INTERPRET=1` must be set before any `@triton.jit` function is defined, i.e. before `workbench_kernels`
modules are imported, so it is set here at import time. When a CUDA device is present we leave it unset and
the same tests run the compiled kernels.

The interpreter rounds float downcasts wrongly and multiplies bf16 dots as integers (see
`workbench_kernels._interpret`); `install()` swaps those two primitives for torch's exact operations. The kernels
themselves run unchanged, so tolerances stay tight and a real kernel bug still fails. Before any test runs,
`verify()` checks on probe kernels that the fixes hold for the installed Triton; if they do not, the whole
session stops instead of testing kernels against wrong arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from workbench_kernels import _interpret  # noqa: E402  (needs TRITON_INTERPRET set first)

if not ON_GPU:
    _interpret.install()
    _problems = _interpret.verify()
    if _problems:
        raise pytest.UsageError(
            "Triton interpreter fixes do not hold on this Triton version; kernel tests would compare wrong numbers:\n"
            + "\n".join(_problems)
        )

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
