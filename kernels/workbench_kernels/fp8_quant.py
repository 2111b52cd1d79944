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


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


def act_quant(x: torch.Tensor, block: int = 128, fmt: str = "e4m3",
              ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of `x` [..., K] in 1 x `block` tiles.

    Returns:
        q: [..., K] FP8 codes.
        scales: [..., ceil(K / block)] fp32, x ≈ q * scales (broadcast per tile).
    """
    check_dtype("x", x, ACT_DTYPES)
    _check_block(block)
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


def act_quant_ref(x: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                  ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `act_quant`."""
    qdtype = fp8_dtype(fmt)
    fmax = FP8_MAX[qdtype]
    K = x.shape[-1]
    n_blocks = cdiv(K, block)
    xf = _pad_last(x.float(), n_blocks * block - K).unflatten(-1, (n_blocks, block))  # [..., nb, b]
    s = xf.abs().amax(dim=-1).clamp_min(1e-4) / fmax  # [..., nb]
    if ue8m0:
        s = pow2_ceil_ref(s)
    q = (xf / s.unsqueeze(-1)).clamp(-fmax, fmax).to(qdtype)
    return q.flatten(-2)[..., :K], s


def weight_quant(w: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` [N, K] in `block` x `block` blocks.

    Returns:
        q: [N, K] FP8 codes.
        scale_inv: [ceil(N / block), ceil(K / block)] fp32, w ≈ q * scale_inv (DeepSeek's `weight_scale_inv`).
    """
    check_dtype("w", w, ACT_DTYPES)
    _check_block(block)
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


def weight_quant_ref(w: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                     ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `weight_quant`."""
    qdtype = fp8_dtype(fmt)
    fmax = FP8_MAX[qdtype]
    N, K = w.shape
    nb_n, nb_k = cdiv(N, block), cdiv(K, block)
    wf = torch.zeros(nb_n * block, nb_k * block, dtype=torch.float32, device=w.device)
    wf[:N, :K] = w.float()
    blocks = wf.view(nb_n, block, nb_k, block)  # [nb_n, b, nb_k, b]
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4) / fmax  # [nb_n, nb_k]
    if ue8m0:
        s = pow2_ceil_ref(s)
    q = (blocks / s[:, None, :, None]).clamp(-fmax, fmax).to(qdtype)
    return q.view(nb_n * block, nb_k * block)[:N, :K].contiguous(), s


def _check_scale_grid(w: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int]) -> None:
    bn, bk = (block, block) if isinstance(block, int) else block
    want = (cdiv(w.shape[0], bn), cdiv(w.shape[1], bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(w.shape)} weight in {bn}x{bk} "
            f"blocks needs {want} (ceil of each dim / block)"
        )


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = w_fp8 * scale_inv per block: [N, K] FP8 and [ceil(N/b), ceil(K/b)] fp32 -> [N, K] `out_dtype`."""
    check_dtype("w_fp8", w_fp8, tuple(FP8_MAX))
    check_dtype("scale_inv", scale_inv, (torch.float32,))
    check_dtype("out", torch.empty(0, dtype=out_dtype), ACT_DTYPES)
    _check_block(block)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be [N, K], got shape {tuple(w_fp8.shape)}")
    _check_scale_grid(w_fp8, scale_inv, block)
    check_launchable(weight_dequant_kernel, w_fp8, scale_inv)
    w_fp8, scale_inv = w_fp8.contiguous(), scale_inv.contiguous()
    N, K = w_fp8.shape
    w = torch.empty(N, K, dtype=out_dtype, device=w_fp8.device)
    if w.numel():
        weight_dequant_kernel[scale_inv.shape](w_fp8, scale_inv, w, N, K, BLOCK=block)
    return w


def weight_dequant_ref(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = 128,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch `weight_dequant`; handles partial last blocks, and (bn, bk) blocks as checkpoints declare them."""
    _check_scale_grid(w_fp8, scale_inv, block)
    N, K = w_fp8.shape
    bn, bk = (block, block) if isinstance(block, int) else block
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]  # [N, K]
    return (w_fp8.float() * s).to(out_dtype)


def act_dequant_ref(q: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x = q * scales per 1 x `block` tile: [..., K] FP8, [..., ceil(K/b)] -> [..., K] fp32."""
    K = q.shape[-1]
    return q.float() * scales.repeat_interleave(block, -1)[..., :K]


def pow2_ceil_ref(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (positive normal fp32): the UE8M0 scale of DeepSeek-V3.1."""
    bits = s.float().contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad the last dim of `x` with `n` zeros."""
    return torch.nn.functional.pad(x, (0, n)) if n else x
