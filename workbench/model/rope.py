"""Rotary position embedding with YaRN, for the decoupled rope part of MLA (width R = qk_rope_head_dim).

YaRN (arXiv 2309.00071) blends interpolated and extrapolated frequencies along a ramp between the dims that
rotate `beta_fast` and `beta_slow` times over the original context, and scales cos/sin by `attention_factor`;
the matching softmax-temperature correction (mscale_all_dim) lives in `ModelConfig.softmax_scale`.

Layout: DeepSeek checkpoints store rope dims as interleaved pairs (x0, x1), (x2, x3)... (`rope_interleave`).
We rotate the pairs and emit [rotated evens | rotated odds]; q and k get the same permutation, so q·k, and with it
every logit, is unchanged. With `rope_interleave=False` the halves layout (rotate_half) is used instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from workbench.config import ModelConfig, rope_type, yarn_mscale


def rope_inv_freq(dim: int, theta: float, rope_scaling: Mapping[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale (YaRN's attention_factor; 1 without scaling)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [R/2]
    extrapolated = 1.0 / pos_freqs
    if not rope_scaling or rope_type(rope_scaling) == "default":
        return extrapolated, 1.0
    factor = float(rope_scaling["factor"])
    original_max = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [R/2]
    extrapolation_weight = 1.0 - ramp
    interpolated = extrapolated / factor
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables for positions; plain object (no parameters, nothing in the state dict)."""

    def __init__(self, config: ModelConfig) -> None:
        self.dim = config.qk_rope_head_dim
        self.interleaved = config.rope_interleave
        self.inv_freq, self.attention_factor = rope_inv_freq(self.dim, config.rope_theta, config.rope_scaling)
        self._last_rotation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] or [B, S] -> cos, sin [..., R/2] in fp32, scaled by attention_factor."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)  # [..., R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, *mid, R] with cos/sin [S, R/2], broadcast over batch and the middle (head) dims.

        A single fp32 position (a decode step) rotates by one matmul with `rotation_matrix` (built once per step
        and shared by every layer), instead of the ~10 elementwise ops below; the same numbers up to rounding
        (tested against them)."""
        if cos.shape[0] == 1 and x.dtype == torch.float32 and cos.dim() == 2:
            return x @ self.rotation_matrix(cos, sin)
        return self.apply_elementwise(x, cos, sin)

    def rotation_matrix(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotation of one position as an [R, R] fp32 matrix M (x @ M = `apply_elementwise`), with this
        layout's pair order and output permutation folded in; cached for the last (cos, sin) seen."""
        last = self._last_rotation  # read once: another thread may replace it meanwhile
        if last is not None and last[0] is cos and last[1] is sin:
            return last[2]
        half = self.dim // 2
        c, s = cos[0].float(), sin[0].float()  # [R/2]
        j = torch.arange(half, device=cos.device)
        first, second = (2 * j, 2 * j + 1) if self.interleaved else (j, j + half)  # rows of x1, x2
        m = torch.zeros(self.dim, self.dim, device=cos.device)  # [R, R]
        m[first, j], m[second, j] = c, -s  # out[:half] = x1 cos - x2 sin
        m[second, j + half], m[first, j + half] = c, s  # out[half:] = x2 cos + x1 sin
        self._last_rotation = (cos, sin, m)
        return m

    def apply_elementwise(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply` for any positions and dtype, spelled out: the reference the one-position matmul is tested against."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
        dtype = x.dtype
        x = x.float()
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
