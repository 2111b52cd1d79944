"""V4's rotary embedding: two tables, interleaved pairs on the last R channels, channel order preserved.

Shape legend: B batch, S positions, R qk_rope_head_dim, d head (or entry) width, R/2 rotated pairs.

- "main" (`rope_theta`, no YaRN) serves the sliding-window-only layers; "compress" (`compress_rope_theta` with the
  config's YaRN `rope_scaling`) serves CSA/HCA layers: their queries, window keys, compressed entries and indexer.
- No YaRN mscale anywhere: cos/sin are unscaled (transformers forces attention_factor 1; DeepSeek's code has none).
- Unlike V3's MLA (which emits [evens | odds]), the rotated pairs stay in place: K = V here, and the value's
  channels feed o_a_proj, so permuting them would change the output. `unrotate` (angle -t) takes the key's
  rotation back off the attention output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from workbench.config import ModelConfig
from workbench.model.rope import rope_inv_freq


class V4Rotary:
    """cos/sin for positions and the in-place-order rotation; a plain object (nothing in the state dict)."""

    def __init__(self, dim: int, theta: float, rope_scaling: Mapping[str, Any] | None) -> None:
        if dim <= 0 or dim % 2:
            raise ValueError(f"V4 rope needs a positive even qk_rope_head_dim, got {dim}")
        self.dim = dim
        with torch.device("cpu"):  # a real table even when the model is built on the meta device (the loader does)
            self.inv_freq, _ = rope_inv_freq(dim, theta, rope_scaling)  # [R/2]; V4 drops YaRN's attention factor
        self._rotations: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []  # see rotation_matrix

    @classmethod
    def main(cls, config: ModelConfig) -> V4Rotary:
        return cls(config.qk_rope_head_dim, config.rope_theta, None)

    @classmethod
    def compress(cls, config: ModelConfig) -> V4Rotary:
        return cls(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling)

    @classmethod
    def for_layer(cls, config: ModelConfig, layer: int) -> V4Rotary:
        return cls.compress(config) if config.compress_ratio(layer) else cls.main(config)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] -> cos, sin [S, R/2] fp32."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)  # [S, R/2]
        return freqs.cos(), freqs.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the last R channels of x [B, S, *heads, d] by the angles of cos/sin [S, R/2]; pairs (2i, 2i+1)
        stay where they are. Computed in fp32, returned in x's dtype.

        One fp32 position (a decode step) rotates by one matmul with the [d, d] `rotation_matrix` (identity on
        the first d - R channels) instead of the ~14 elementwise ops of `rotate_elementwise`: the same numbers up
        to rounding for finite x (tested against them); a step's q, key, values and indexer queries share it."""
        if cos.shape[0] == 1 and x.dtype == torch.float32:
            return x @ self.rotation_matrix(cos, sin, x.shape[-1])
        return self.rotate_elementwise(x, cos, sin)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The inverse rotation (angle -t): undoes `rotate` at the same positions (for one position: the
        rotation matrix's transpose, which is exactly the matrix of angle -t)."""
        if cos.shape[0] == 1 and x.dtype == torch.float32:
            return x @ self.rotation_matrix(cos, sin, x.shape[-1]).T
        return self.rotate_elementwise(x, cos, -sin)

    def rotation_matrix(self, cos: torch.Tensor, sin: torch.Tensor, width: int) -> torch.Tensor:
        """x @ M = `rotate_elementwise(x, cos, sin)` for one position (cos/sin [1, R/2]) and x [..., width]:
        M [width, width] fp32 is the identity but for the last R x R block, where pair i holds
        [[c_i, s_i], [-s_i, c_i]]. The last few built are kept (a step rotates q, keys, values and indexer
        queries at one position, entries at another), keyed by the cos/sin tensors themselves."""
        found = self._rotations  # read once: another thread may replace it meanwhile
        for c_seen, s_seen, w_seen, m in found:
            if c_seen is cos and s_seen is sin and w_seen == width:
                return m
        R = self.dim
        c, s = cos[0].float(), sin[0].float()  # [R/2]
        m = torch.eye(width, device=cos.device)
        # [a, b, i] = M[width-R + 2i+a, width-R + 2i+b]: out_even = e c - o s, out_odd = o c + e s
        pairs = m[width - R :, width - R :].view(R // 2, 2, R // 2, 2).diagonal(dim1=0, dim2=2)  # [2, 2, R/2]
        pairs.copy_(torch.stack([c, s, -s, c]).view(2, 2, R // 2))
        self._rotations = [(cos, sin, width, m), *found[: _KEPT_ROTATIONS - 1]]
        return m

    def rotate_elementwise(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`rotate` for any positions and dtype, spelled out: the reference the one-position matmul is tested
        against."""
        R = self.dim
        shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (R // 2,)  # [S, 1.., R/2] broadcast over heads
        cos, sin = cos.view(shape), sin.view(shape)
        pairs = x[..., -R:].float().unflatten(-1, (R // 2, 2))  # [B, S, *heads, R/2, 2]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)  # [.., R]
        return torch.cat([x[..., :-R], rotated.to(x.dtype)], dim=-1)


_KEPT_ROTATIONS = 4  # rotation matrices a V4Rotary keeps: a decode step uses two positions at two widths
