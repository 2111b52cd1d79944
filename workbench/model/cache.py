"""The MLA latent KV cache: per layer only c_kv (after kv_a_layernorm) and the shared rope key k_pe.

That is C + R numbers per token and layer (576 for V3) instead of nH * (qk_head_dim + v_head_dim) for MHA.
DeepSeek-V3.2 also keeps its lightning indexer's keys (dI = index_head_dim, post-LayerNorm post-RoPE: 128 more
for V3.2); V2/V3 caches have none.
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
        self.index_keys: torch.Tensor | None = None  # [L, B, S_max, dI] when the model has a token indexer (V3.2)
        if config.model_type == "deepseek_v32":
            self.index_keys = torch.zeros(L, batch, max_len, config.index_head_dim, dtype=dtype, device=device)
        self.length = 0  # tokens already cached (same for every sequence in the batch)

    def append(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new [B, S, C] / [B, S, R] at `length` and return the whole history of this layer."""
        end = self._end(c_kv)
        self.c_kv[layer, :, self.length : end] = c_kv
        self.k_pe[layer, :, self.length : end] = k_pe
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end]

    def append_index_keys(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Write the indexer's new keys [B, S, dI] at `length` and return this layer's whole history [B, T, dI]."""
        if self.index_keys is None:
            raise ValueError("this cache keeps no indexer keys: its config has no token indexer (DeepSeek-V3.2)")
        end = self._end(keys)
        self.index_keys[layer, :, self.length : end] = keys
        return self.index_keys[layer, :, :end]

    def _end(self, new: torch.Tensor) -> int:
        """Where the S tokens of `new` [B, S, ...] end once written at `length`; refuses a wrong batch or overflow."""
        B, S = new.shape[:2]
        if self.batch != B:
            raise ValueError(f"cache holds batch {self.batch}, got {B}")
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"cache full: {self.length} cached + {S} new > max_len {self.max_len}")
        return end

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer appended its `n` tokens."""
        self.length += n

    def nbytes_used(self) -> int:
        index = self.index_keys.shape[-1] if self.index_keys is not None else 0
        width = self.c_kv.shape[-1] + self.k_pe.shape[-1] + index
        per_token = width * self.c_kv.element_size() * self.c_kv.shape[0]
        return per_token * self.length * self.batch
