"""FP8 block quantization as DeepSeek-V3 does it: activations in 1x128 tiles per token, weights in 128x128 blocks.

Design choices:
- scale = max(amax, 1e-4) / fp8_max per tile, stored in fp32; the tile is divided by it and cast with
  round-to-nearest-even, saturating at fp8_max (448 for e4m3, 57344 for e5m2), as `cvt.rn.satfinite` does.
- Weights keep DeepSeek checkpoints' `weight_scale_inv` convention: w_fp32 = w_fp8 * scale_inv per 128x128 block.
- `ue8m0=True` rounds each scale *up* to a power of two (DeepSeek-V3.1's UE8M0 scales). We take the float's
  exponent and add one when any mantissa bit is set: this equals DeepSeek's `2 ** ceil(log2(s))` exactly without
  depending on the accuracy of a device `log2`.
- A last partial block (e.g. the 576 rows of V3's `kv_a_proj_with_mqa`) gets its own scale over the valid
  elements only; the scale grid is always ceil(rows / 128) x ceil(cols / 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import ACT_DTYPES, FP8_MAX, cdiv, check_dtype, check_launchable, fp8_dtype
from .reference import check_block, check_scale_grid

# M = rows (tokens), K = columns (hidden), N = weight rows; b = block (128)


@triton.jit
def _pow2_ceil(s):
    """Smallest power of two >= s, for positive normal fp32 s."""
    bits = s.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_tile(x, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """One tile (any shape, fp32) -> (x / s saturated to +-FP8_MAX, its scale s): one scale per tile."""
    s = tl.maximum(tl.max(tl.abs(x)), 1e-4) / FP8_MAX
    if UE8M0:
        s = _pow2_ceil(s)
    return tl.clamp(x / s, -FP8_MAX, FP8_MAX), s


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, K, n_blocks, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)  # [b]
    y, s = _quantize_tile(x, FP8_MAX, UE8M0)
    tl.store(q_ptr + row * K + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * n_blocks + blk, s)


@triton.jit
def weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [b, b]
    y, s = _quantize_tile(w, FP8_MAX, UE8M0)
    tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k, s)


@triton.jit
def weight_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [b, b]
    s = tl.load(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k)
    tl.store(w_ptr + offs, (q * s).to(w_ptr.dtype.element_ty), mask=mask)


def act_quant(x: torch.Tensor, block: int = 128, fmt: str = "e4m3",
              ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of `x` [..., K] in 1 x `block` tiles.

    Returns:
        q: [..., K] FP8 codes.
        scales: [..., ceil(K / block)] fp32, x ≈ q * scales (broadcast per tile).
    """
    check_dtype("x", x, ACT_DTYPES)
    check_block(block)
    qdtype = fp8_dtype(fmt)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    check_launchable(act_quant_kernel, x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M, n_blocks = x2.shape[0], cdiv(K, block)
    q = torch.empty(x2.shape, dtype=qdtype, device=x.device)
    s = torch.empty(M, n_blocks, dtype=torch.float32, device=x.device)
    if M:
        act_quant_kernel[(M, n_blocks)](x2, q, s, K, n_blocks, FP8_MAX=FP8_MAX[qdtype], UE8M0=ue8m0, BLOCK=block)
    return q.view(x.shape), s.view(*x.shape[:-1], n_blocks)


def weight_quant(w: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` [N, K] in `block` x `block` blocks.

    Returns:
        q: [N, K] FP8 codes.
        scale_inv: [ceil(N / block), ceil(K / block)] fp32, w ≈ q * scale_inv (DeepSeek's `weight_scale_inv`).
    """
    check_dtype("w", w, ACT_DTYPES)
    check_block(block)
    if w.dim() != 2:
        raise ValueError(f"w must be [N, K], got shape {tuple(w.shape)}")
    qdtype = fp8_dtype(fmt)
    check_launchable(weight_quant_kernel, w)
    w = w.contiguous()
    N, K = w.shape
    q = torch.empty(N, K, dtype=qdtype, device=w.device)
    s = torch.empty(cdiv(N, block), cdiv(K, block), dtype=torch.float32, device=w.device)
    if q.numel():
        weight_quant_kernel[s.shape](w, q, s, N, K, FP8_MAX=FP8_MAX[qdtype], UE8M0=ue8m0, BLOCK=block)
    return q, s


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = w_fp8 * scale_inv per block: [N, K] FP8 and [ceil(N/b), ceil(K/b)] fp32 -> [N, K] `out_dtype`."""
    check_dtype("w_fp8", w_fp8, tuple(FP8_MAX))
    check_dtype("scale_inv", scale_inv, (torch.float32,))
    check_dtype("out", torch.empty(0, dtype=out_dtype), ACT_DTYPES)
    check_block(block)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be [N, K], got shape {tuple(w_fp8.shape)}")
    check_scale_grid(w_fp8, scale_inv, block)
    check_launchable(weight_dequant_kernel, w_fp8, scale_inv)
    w_fp8, scale_inv = w_fp8.contiguous(), scale_inv.contiguous()
    N, K = w_fp8.shape
    w = torch.empty(N, K, dtype=out_dtype, device=w_fp8.device)
    if w.numel():
        weight_dequant_kernel[scale_inv.shape](w_fp8, scale_inv, w, N, K, BLOCK=block)
    return w
