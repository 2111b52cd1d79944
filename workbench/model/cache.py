"""The MLA latent KV cache: per layer only c_kv (after kv_a_layernorm) and the shared rope key k_pe.

That is C + R numbers per token and layer (576 for V3) instead of nH * (qk_head_dim + v_head_dim) for MHA.
Buffers are preallocated to `max_len`, so decoding appends in place and never re-copies the history.
"""

from __future__ import annotations

import torch

from workbench.config import ModelConfig


class LatentKVCache:
    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache max_len={max_len} exceeds max_position_embeddings={config.max_position_embeddings}")
        L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.batch, self.max_len = batch, max_len
        self.c_kv = torch.zeros(L, batch, max_len, C, dtype=dtype, device=device)  # [L, B, S_max, C]
        self.k_pe = torch.zeros(L, batch, max_len, R, dtype=dtype, device=device)  # [L, B, S_max, R]
        self.length = 0  # tokens already cached (same for every sequence in the batch)

    def append(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new [B, S, C] / [B, S, R] at `length` and return the whole history of this layer."""
        B, S, _ = c_kv.shape
        if self.batch != B:
            raise ValueError(f"cache holds batch {self.batch}, got {B}")
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"cache full: {self.length} cached + {S} new > max_len {self.max_len}")
        self.c_kv[layer, :, self.length : end] = c_kv
        self.k_pe[layer, :, self.length : end] = k_pe
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer appended its `n` tokens."""
        self.length += n

    def nbytes_used(self) -> int:
        per_token = (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.element_size() * self.c_kv.shape[0]
        return per_token * self.length * self.batch
