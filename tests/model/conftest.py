"""Model tests that run the Triton backend use the CPU interpreter with its numeric bugs fixed
(tests/triton_interpreter.py, imported here before any kernel module). The torch-backend tests are unaffected."""

from __future__ import annotations

import pytest
import torch

import tests.triton_interpreter  # noqa: F401  (sets TRITON_INTERPRET before any kernel module is imported)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine their spinning costs
    several times the work; restored afterwards. Modules opt in with `pytestmark = usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
