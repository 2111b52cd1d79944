"""Test setup for the Triton kernels: the CPU interpreter with its numeric bugs fixed (tests/triton_interpreter.py)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import DEVICE  # first: sets TRITON_INTERPRET before any kernel module is imported


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
