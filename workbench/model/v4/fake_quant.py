"""DeepSeek-V4's quantization-aware-training simulations, as its reference inference code applies them (brief §3.1;
transformers applies none, so they are opt-in and off by default).

- KV FP8: the non-rope channels of window keys and of compressed entries are rounded to FP8 e4m3 in blocks of 64
  with power-of-two ("ue8m0") scales, then used in high precision ("FP8-simulate non-rope dims to match QAT").
- Indexer FP4: indexer queries and compressed indexer keys are rotated by the normalised Sylvester Hadamard
  matrix (orthogonal: exact scores unchanged, outliers spread over channels), then rounded to FP4 e2m1 in blocks
  of 32 with power-of-two scales.
A last block shorter than the block size (tiny test widths) gets its own scale; DeepSeek's widths never have one.

Shape legend: ... any leading dims, K the quantized (last) dim, n a power of two.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite e4m3 value
FP4_MAX = 6.0  # largest e2m1 value
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes; even indices have an even (zero) mantissa bit
KV_FP8_BLOCK = 64
INDEXER_FP4_BLOCK = 32


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 x) for positive x, exactly (frexp, not a rounded log2: DeepSeek reads the exponent bits)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).to(exponent.dtype))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[..., K] fp32 -> [..., ceil(K/block), block] (zero-padded) and K."""
    K = x.shape[-1]
    padded = F.pad(x.float(), (0, -K % block))
    return padded.unflatten(-1, (-1, block)), K


def fp8_e4m3_fake_quant(x: torch.Tensor, block: int = KV_FP8_BLOCK) -> torch.Tensor:
    """Round [..., K] to e4m3 codes times a power-of-two scale per block of `block` channels, back in x's dtype."""
    blocks, K = _blocks(x, block)  # [..., nb, block]
    scale = pow2_ceil(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_MAX)  # [..., nb, 1]
    codes = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (codes * scale).flatten(-2)[..., :K].to(x.dtype)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest e2m1 value, ties to the even code (IEEE round-to-nearest-even)."""
    grid = torch.tensor(E2M1_GRID, device=x.device)
    midpoints = (grid[1:] + grid[:-1]) / 2  # [7]
    magnitude = x.abs()
    lower = torch.searchsorted(midpoints, magnitude)  # codes below the first midpoint >= |x|
    tie = magnitude == midpoints[lower.clamp(max=len(midpoints) - 1)]
    code = torch.where(tie & (lower % 2 == 1), lower + 1, lower)  # a tie goes to the even code
    return grid[code] * x.sign()


def fp4_e2m1_fake_quant(x: torch.Tensor, block: int = INDEXER_FP4_BLOCK) -> torch.Tensor:
    """Round [..., K] to e2m1 values times a power-of-two scale per block of `block` channels, in x's dtype."""
    blocks, K = _blocks(x, block)  # [..., nb, block]
    scale = pow2_ceil(blocks.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126) / FP4_MAX)
    codes = e2m1_round((blocks / scale).clamp(-FP4_MAX, FP4_MAX))
    return (codes * scale).flatten(-2)[..., :K].to(x.dtype)


@functools.lru_cache(maxsize=8)
def sylvester_hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H_n (entries ±1, Sylvester order: H_2n = [[H, H], [H, -H]]) scaled by n^-1/2, so it is orthogonal. [n, n]"""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two width, got index_head_dim={n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n**-0.5).to(device=device, dtype=dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] @ H_n / sqrt(n) (H is symmetric, so this is also H x), computed in fp32."""
    h = sylvester_hadamard(x.shape[-1], x.device, torch.float32)
    return (x.float() @ h).to(x.dtype)


def indexer_fp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The indexer's simulation: Hadamard rotation, then FP4 e2m1 in blocks of 32. [..., d_I] -> [..., d_I]"""
    return fp4_e2m1_fake_quant(hadamard_rotate(x))


def kv_fp8_fake_quant(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 e4m3 (blocks of 64) on the non-rope channels of [..., d]; the last `rope_dim` channels stay exact."""
    return torch.cat([fp8_e4m3_fake_quant(kv[..., :-rope_dim]), kv[..., -rope_dim:]], dim=-1)
