"""Model tests that run the Triton backend: kernels in Triton's CPU interpreter, its numeric bugs fixed.

As in tests/kernels/conftest.py: `TRITON_INTERPRET=1` must be set before any `@triton.jit` function is defined,
i.e. before `workbench_kernels` (or `workbench.model.fp8` / `backend`, which import it) is imported, so it is set
here at import time; `_interpret.install()` swaps the interpreter's wrong float downcasts and bf16 dots for torch's
exact ones and `verify()` checks that the fix holds. With a CUDA device the compiled kernels run instead.
The torch-backend tests in this folder do not touch Triton and are unaffected.
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
        raise pytest.UsageError("Triton interpreter fixes do not hold on this Triton version:\n" + "\n".join(_problems))
