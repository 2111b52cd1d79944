"""When a Triton kernel can be launched, the errors a launcher raises when it cannot, and the dtype checks that
launchers and references share. Imports torch only (Triton inside `check_launchable`, which only launchers call).

Triton runs a kernel either compiled for a CUDA device or, with `TRITON_INTERPRET=1`, in its numpy interpreter.
The interpreter is chosen when `@triton.jit` runs, i.e. when a kernel module is imported, so a launcher checks
both the environment now and how its kernel was built, and says which of the two is wrong.
"""

from __future__ import annotations

import os

import torch


class KernelUnavailableError(RuntimeError):
    """Triton cannot run this kernel here: Triton is not installed, or there is no CUDA device and no interpreter."""


def interpreter_requested() -> bool:
    """Whether `TRITON_INTERPRET` is set now (read at call time, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise `KernelUnavailableError` unless `kernel` can run on the device of `tensors`."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    from triton.runtime.interpreter import InterpretedFunction  # only launchers call this; they imported Triton

    interpreted = isinstance(kernel, InterpretedFunction)
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    if device.type == "cuda":
        return  # compiled kernels run on CUDA; an interpreted kernel copies CUDA tensors to the host and back
    if not interpreter_requested():
        raise KernelUnavailableError(
            f"{name}: tensors are on {device} and TRITON_INTERPRET is not set; Triton kernels need a CUDA device or "
            "TRITON_INTERPRET=1 (set before importing workbench_kernels). Use the `*_ref` function or the torch "
            "backend on this machine."
        )
    if not interpreted:
        raise KernelUnavailableError(
            f"{name}: TRITON_INTERPRET=1 was set after workbench_kernels was imported, so its kernels were built "
            "for a GPU; set it before the first import."
        )


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise `ValueError` naming the argument when `t.dtype` is not one of `allowed`."""
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in allowed)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, legend: str) -> None:
    """Raise `ValueError` when `t` does not have `ndim` dimensions (legend e.g. "[T, H]")."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {legend}, got shape {tuple(t.shape)}")


FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
ACT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def fp8_dtype(fmt: str) -> torch.dtype:
    """torch dtype for an FP8 format name, "e4m3" (DeepSeek-V3's choice) or "e5m2"."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    return FP8_DTYPES[fmt]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
