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
        stay where they are. Computed in fp32, returned in x's dtype."""
        R = self.dim
        shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (R // 2,)  # [S, 1.., R/2] broadcast over heads
        cos, sin = cos.view(shape), sin.view(shape)
        pairs = x[..., -R:].float().unflatten(-1, (R // 2, 2))  # [B, S, *heads, R/2, 2]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)  # [.., R]
        return torch.cat([x[..., :-R], rotated.to(x.dtype)], dim=-1)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The inverse rotation (angle -t): undoes `rotate` at the same positions."""
        return self.rotate(x, cos, -sin)
