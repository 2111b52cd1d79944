"""Run Triton kernels in the CPU interpreter with its numeric bugs fixed; imported first by the conftests that need it.

`TRITON_INTERPRET=1` must be set before any `@triton.jit` function is defined, i.e. before a launcher module of
`workbench_kernels` is imported (the model imports one when a Triton backend first runs), so importing this module
sets it. With a CUDA
device it is left unset and the same tests run the compiled kernels.

The interpreter rounds float downcasts wrongly and multiplies bf16 dots as integers (see
`workbench_kernels._interpret`); `install()` swaps those two primitives for torch's exact operations. The kernels
themselves run unchanged, so tolerances stay tight and a real kernel bug still fails. `verify()` checks on probe
kernels that the fixes hold for the installed Triton; if they do not, the session stops instead of testing kernels
against wrong arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
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
