"""The one place a block asks how to compute: which backend runs an op, and which FP8 sites a run computes in FP8.

Backends: every module starts at "auto", which picks the Triton kernel on a CUDA device where Triton is installed
and the kernel supports the case, and the torch reference everywhere else (CPU, MPS, a machine without Triton).
"torch" always runs the reference; "triton" (set by `workbench.model.backend.set_backend`) never falls back: it
raises `KernelUnavailableError` where Triton cannot run (not installed; no CUDA device and no
`TRITON_INTERPRET=1` set before the first kernel import) and `ValueError` for a case the kernel does not take.

Module kinds, each with its kernel in `workbench_kernels`:
- "gate": the MoE router (scores, bias, group-limited top-k, weights) -> `moe_gate`.
- "experts": routed experts -> `fused_moe` (weights in the activation dtype, or FP8 e4m3 with fp32 scales).
- "fp8_linear": `FP8Linear`s -> `act_quant` + `fp8_gemm`.
- "attn_decode": absorbed-MLA decode steps (S == 1 with a cache, mode="absorb") -> `mla_decode`.

Triton is imported here only, lazily, inside `launcher` (the first time a kernel is actually run), so the torch
path imports no Triton anywhere. This module imports no block; blocks import it.

Per-run FP8 (`Controls(fp8=...)`): `run_fp8_sites(sites)` sets, for the layer running now and only in the calling
thread or task (a ContextVar), exactly which FP8 sites (`workbench.model.fp8.SITES`) compute in FP8; blocks read
`fp8_run_sites()`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Literal

import torch

from workbench_kernels._runtime import KernelUnavailableError, check_launchable

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
KINDS = ("gate", "experts", "fp8_linear", "attn_decode")
LAUNCHERS = ("fp8_quant", "fp8_gemm", "moe_gate", "fused_moe", "mla_decode")

__all__ = ["BACKENDS", "KINDS", "Backend", "KernelUnavailableError", "fp8_run_sites", "launcher", "require_triton",
           "resolve_backend", "run_fp8_sites", "triton_missing", "use_triton"]


# ---------------------------------------------------------------------------------------------- Triton
@functools.cache
def triton_missing() -> str | None:
    """Why Triton cannot be imported in this process (None when it can). Imports Triton; cached."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"Triton is not installed or does not import here ({e})"
    return None


def launcher(name: str) -> ModuleType:
    """The kernel module `workbench_kernels.<name>` (imports Triton); `KernelUnavailableError` when it cannot."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown kernel module {name!r}; known: {list(LAUNCHERS)}")
    why = triton_missing()
    if why is not None:
        raise KernelUnavailableError(f"{why}; the Triton backend needs it (pip install triton on Linux), "
                                     "the torch backend runs everywhere")
    return importlib.import_module(f"workbench_kernels.{name}")


def require_triton(device: torch.device | str) -> None:
    """Raise `KernelUnavailableError` (saying why) unless Triton kernels can run on `device` in this process."""
    check_launchable(launcher("fp8_quant").act_quant_kernel, torch.empty(0, device=device))


def resolve_backend(backend: str, device: torch.device, kind: str, supported: bool = True, why: str = "") -> Backend:
    """"torch" or "triton" for one call of a `kind` op on `device`.

    "auto" picks triton on CUDA when the kernel takes the case (`supported`) and Triton imports; explicit "triton"
    on an unsupported case raises ValueError with `why`.
    """
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not supported:
            raise ValueError(f"triton backend for {kind}: {why}; use the torch backend for this module")
        return "triton"
    if backend == "auto":
        return "triton" if device.type == "cuda" and supported and triton_missing() is None else "torch"
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def use_triton(backend: str, device: torch.device, kind: str, supported: bool = True, why: str = "") -> bool:
    """Whether this call runs the kernel (see `resolve_backend`); cheap when the answer is torch."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    return resolve_backend(backend, device, kind, supported, why) == "triton"


# ---------------------------------------------------------------------------------------------- per-run FP8
# The FP8 sites of the layer running now under a run's controls, in this thread or task only; None: as the modules are.
FP8_RUN_SITES: ContextVar[frozenset[str] | None] = ContextVar("workbench_fp8_run_sites", default=None)


@contextmanager
def run_fp8_sites(sites: frozenset[str] | None) -> Iterator[None]:
    """Within the block, exactly `sites` compute in FP8 in this thread; None: as the modules are."""
    token = FP8_RUN_SITES.set(sites)
    try:
        yield
    finally:
        FP8_RUN_SITES.reset(token)


def fp8_run_sites() -> frozenset[str] | None:
    """The FP8 sites a run's controls set for the layer running now in this thread (None: no such control)."""
    return FP8_RUN_SITES.get()
