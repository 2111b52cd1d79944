"""FP4 (e2m1) with power-of-two block scales: the format of DeepSeek-V4's routed experts and its indexer QAT.

- A code is 4 bits, sign + 2 exponent + 1 mantissa bit: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} (codes 0..7), the
  same with the sign bit set (codes 8..15; code 8 is -0). Two codes share one int8 byte, the **low nibble holding
  the even column** (DeepSeek's checkpoints and transformers' `_unpack_fp4`).
- Every `block` (32) consecutive values along the last dim share one scale, a power of two stored as ue8m0
  (`torch.float8_e8m0fnu`, the exponent byte alone): value = e2m1(code) * scale.
- `quantize_fp4` picks scale = 2^ceil(log2(amax / 6)) per block (amax clamped at 6 * 2^-126, so the scale is a
  normal fp32) and rounds x / scale to the nearest grid value, ties to the even code, as DeepSeek-V4's
  `fp4_act_quant` (kernel.py) does; nothing is clipped except by that rounding, since |x| / scale <= 6.
- `fake_quant_fp4` is quantize-then-dequantize without packing: the FP4 *simulation* of weights or activations.
The grid values times any power of two in fp32's range are exact in fp32 and bf16 (two significant bits), so
dequantized FP4 weights lose nothing in either dtype.

Shape legend: ... leading dims, K values along the last dim (even; a multiple of `block` to quantize),
G = K / block scale groups.
"""

from __future__ import annotations

import torch

from workbench_kernels.reference import pow2_ceil_ref

FP4_BLOCK = 32  # values per ue8m0 scale (DeepSeek-V4's experts and indexer)
FP4_MAX = 6.0  # largest e2m1 magnitude
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by code
# Rounding |x| onto the grid, ties to even: the magnitude code is the number of these thresholds |x| has passed.
# "> t" keeps a tie at t on the lower (even) code, ">= t" moves it to the upper (even) code.
_ABOVE = (0.25, 1.25, 2.5, 5.0)  # ties go down: 0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4
_AT_OR_ABOVE = (0.75, 1.75, 3.5)  # ties go up: 0.75 -> 1, 1.75 -> 2, 3.5 -> 4
_SMALLEST_AMAX = FP4_MAX * 2.0**-126  # keeps the scale of an all-zero block a normal fp32 (DeepSeek's clamp)
_INV_MAX = torch.tensor(1.0 / FP4_MAX, dtype=torch.float32).item()  # fp32 1/6, as the reference multiplies by it


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (ties to even) of each value of `x`, already divided by its scale: [...] -> uint8 [...].

    Magnitudes above 6 saturate to 6; the sign bit follows x's sign bit, so -0.0 gives code 8; NaN gives a zero code.
    """
    m = x.float().abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t in _ABOVE:
        code += m > t
    for t in _AT_OR_ABOVE:
        code += m >= t
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The value of each e2m1 code (0..15): uint8 [...] -> fp32 [...]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, low nibble = even column: uint8 codes [..., K] -> int8 [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dim must be even (two codes per byte), got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return ((c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 (or uint8) [..., K/2] holding two codes per byte -> uint8 codes [..., K], even column from the low nibble."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"unpack_fp4: packed FP4 is int8 or uint8, got {packed.dtype}")
    b = packed.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)  # [..., K/2, 2] -> [..., K]


def fp4_scales(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Power-of-two scale of each block of `block` values along the last dim: [..., K] -> fp32 [..., G].

    A block holding NaN or inf gets a NaN scale (so a simulation shows NaN, never a finite stand-in).
    """
    _check_block(x, block)
    amax = x.float().unflatten(-1, (-1, block)).abs().amax(dim=-1)  # [..., G]
    scale = pow2_ceil_ref(amax.clamp_min(_SMALLEST_AMAX) * _INV_MAX)
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def quantize_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed int8 [..., K/2], scale float8_e8m0fnu [..., G]): DeepSeek-V4's expert storage.

    Raises ValueError for NaN or inf in `x` (no finite code or scale stands for them).
    """
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_fp4: the input holds NaN or inf, which FP4 with power-of-two scales cannot hold")
    scale = fp4_scales(x, block)  # [..., G]
    codes = e2m1_codes(x.float().unflatten(-1, (-1, block)) / scale[..., None]).flatten(-2)  # [..., K]
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed int8 [..., K/2] x scale [..., G] (ue8m0 or fp32 powers of two) -> [..., K] in `out_dtype`."""
    values = e2m1_values(unpack_fp4(packed))  # [..., K]
    want = (*values.shape[:-1], values.shape[-1] // block)
    if values.shape[-1] % block or tuple(scale.shape) != want:
        raise ValueError(f"dequantize_fp4: {tuple(packed.shape)} packed codes ({values.shape[-1]} values per row) "
                         f"need a scale of shape {want} (one per {block} values), got {tuple(scale.shape)}")
    return (values.unflatten(-1, (-1, block)) * scale.float()[..., None]).flatten(-2).to(out_dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Quantize-dequantize onto the FP4 grid (block scales as `quantize_fp4`): [..., K] -> [..., K] in x's dtype.

    The FP4 simulation of a weight or activation; NaN and inf propagate instead of raising.
    """
    scale = fp4_scales(x, block)[..., None]  # [..., G, 1]
    blocks = x.float().unflatten(-1, (-1, block)) / scale  # [..., G, block]
    q = e2m1_values(e2m1_codes(blocks)) * scale
    return q.flatten(-2).to(x.dtype)


def _check_block(x: torch.Tensor, block: int) -> None:
    if block < 1 or x.shape[-1] % block:
        raise ValueError(f"FP4 blocks of {block} values must tile the last dim, got shape {tuple(x.shape)}")
