"""Make Triton's CPU interpreter (`TRITON_INTERPRET=1`) compute what the GPU computes; used by the test setup.

The interpreter is silently wrong in three places that these kernels touch (checked on Triton 3.9.0):

1. Float downcasts (fp32 -> e4m3 / e5m2 / bf16): its bit-twiddling `_convert_float` drops the rounding carry
   into the exponent (~1% of e4m3 codes come out halved), rounds ties up instead of to even, flushes subnormals,
   and turns values past the FP8 maximum into NaN. The GPU (`cvt.rn.satfinite`) rounds to nearest even, keeps
   subnormals and saturates FP8 at its largest finite value. We route every conversion between float formats
   through torch's round-to-nearest-even cast, saturating finite FP8 outputs as the GPU does.
2. `tl.dot` on bf16: bf16 is held as uint16, so numpy multiplies the bit patterns as integers. We widen bf16
   operands to fp32 first; bf16 x bf16 products are exact in fp32, as in the GPU's MMA.
3. `@triton.autotune` benchmarks with a GPU driver; these kernels do not autotune, so nothing is patched.

Only the conversion and the dot primitives change; the kernel code runs as written, so an indexing, masking or
arithmetic bug in a kernel still fails its test. `verify()` runs probe kernels whose results the unpatched
interpreter gets wrong and tells whether the fixes hold on the installed Triton; the tests call it first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

# Triton releases on which the hooks below were read and `verify()` passed.
CHECKED_TRITON_VERSIONS = ("3.9.0",)

_TORCH_FLOAT: dict[Any, torch.dtype] = {
    tl.float8e4nv: torch.float8_e4m3fn,
    tl.float8e5: torch.float8_e5m2,
    tl.bfloat16: torch.bfloat16,
    tl.float16: torch.float16,
    tl.float32: torch.float32,
    tl.float64: torch.float64,
}
_SATURATE = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_installed = False


class InterpreterPatchError(RuntimeError):
    """The interpreter's internals changed: the fixes cannot be applied, or no longer fix the numbers."""


def _interpreter_module() -> Any:
    from triton.runtime import interpreter

    for hook in ("_convert_float", "InterpreterBuilder"):
        if not hasattr(interpreter, hook):
            raise InterpreterPatchError(
                f"triton {triton.__version__}: triton.runtime.interpreter.{hook} is gone; "
                f"the fixes in {__name__} were written for {CHECKED_TRITON_VERSIONS}"
            )
    if not hasattr(interpreter.InterpreterBuilder, "create_dot"):
        raise InterpreterPatchError(f"triton {triton.__version__}: InterpreterBuilder.create_dot is gone")
    return interpreter


def install() -> None:
    """Patch the interpreter's float conversion and dot (idempotent)."""
    global _installed
    if _installed:
        return
    interp = _interpreter_module()
    from triton._C.libtriton import ir

    original_convert = interp._convert_float
    original_dot = interp.InterpreterBuilder.create_dot

    def convert_float(input: np.ndarray, input_dtype: Any, output_dtype: Any, rounding_mode: Any) -> np.ndarray:
        src, dst = _TORCH_FLOAT.get(input_dtype), _TORCH_FLOAT.get(output_dtype)
        if src is None or dst is None or rounding_mode == ir.ROUNDING_MODE.RTZ:
            return original_convert(input, input_dtype, output_dtype, rounding_mode)
        bits = np.ascontiguousarray(input)
        value = torch.from_numpy(bits.view(f"int{bits.itemsize * 8}")).view(src)  # reinterpret, no copy
        if dst in _SATURATE:  # satfinite: clamp finite values (NaN stays NaN), then round to nearest even
            limit = _SATURATE[dst]
            value = value.to(torch.float64).clamp(-limit, limit)
        out = value.to(dst)
        width = out.element_size()
        return out.view(_INT_OF_WIDTH[width]).numpy().view(f"uint{width * 8}").reshape(np.shape(input))

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp._convert_float = convert_float
    interp.InterpreterBuilder.create_dot = create_dot
    _installed = True


@triton.jit
def _probe_cast_kernel(x_ptr, e4m3_ptr, e5m2_ptr, bf16_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(e4m3_ptr + offs, x.to(tl.float8e4nv))
    tl.store(e5m2_ptr + offs, x.to(tl.float8e5))
    tl.store(bf16_ptr + offs, x.to(tl.bfloat16))


@triton.jit
def _probe_dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
    tl.store(c_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))


def verify() -> list[str]:
    """Run the probes under the interpreter; return what still differs from torch (empty when all is right)."""
    problems = []
    # rounding carries into the exponent (15.9 -> 16 in e4m3), ties to even, subnormals, saturation, signs
    values = [15.9, 0.98, 1.0625, 1.1875, 2.0 ** -8, 3 * 2.0 ** -10, 2.0 ** -17, 470.0, -500.0, 60000.0, 1e6,
              -0.0, 1.00390625, 1.01171875, 3.14159, -2.71828]
    n = 16
    x = torch.tensor(values, dtype=torch.float32)
    e4m3 = torch.empty(n, dtype=torch.float8_e4m3fn)
    e5m2 = torch.empty(n, dtype=torch.float8_e5m2)
    bf16 = torch.empty(n, dtype=torch.bfloat16)
    _probe_cast_kernel[(1,)](x, e4m3, e5m2, bf16, N=n)
    expected_e4m3 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    expected_e5m2 = x.clamp(-57344, 57344).to(torch.float8_e5m2)
    for name, got, want in [("e4m3", e4m3, expected_e4m3), ("e5m2", e5m2, expected_e5m2),
                            ("bf16", bf16, x.to(torch.bfloat16))]:
        if not torch.equal(got.view(torch.uint8 if got.element_size() == 1 else torch.int16),
                           want.view(torch.uint8 if want.element_size() == 1 else torch.int16)):
            problems.append(f"fp32 -> {name}: got {got.float().tolist()}, want {want.float().tolist()}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    c = torch.empty(16, 16)
    _probe_dot_kernel[(1,)](a, b, c, N=16)
    want_c = a.double() @ b.double()
    if not torch.allclose(c.double(), want_c, rtol=1e-5, atol=1e-5):
        problems.append(f"bf16 tl.dot: max error {(c.double() - want_c).abs().max().item():.3g}")
    return problems
