"""The V4 cache: per layer a sliding-window ring, and for CSA/HCA layers the compressor state and its entries.

Shape legend: B batch, W sliding_window, d head_dim, d_I index_head_dim, m the layer's compress rate,
c = 2 for CSA (two overlapping series per token) else 1, N_max = max_len // m.

Per layer (everything preallocated to `max_len`, written in place; a step never re-copies the history):
- `window` [B, W-1, d]: the last W-1 keys (K = V) in a ring, slot p % (W-1); with the current token that is the
  W-token window a query reads. Older keys are only reachable through the compressed entries.
- `compressor` (CSA/HCA) and `indexer` (CSA): a `CompressorState` each, holding the projected kv + gate of the
  < m tokens of the window still open (`buffer_*`, m slots of width c·d), for CSA the previous closed window's
  overlap half (`overlap_*`, what entry w+1 pools from window w), and the entries so far (`entries` [B, N_max, d]).
How many tokens are buffered and how many entries exist follow from `length` (same for the whole batch): the
buffer holds length % m tokens, there are length // m entries. Gates are kept in fp32 (they include the fp32
position bias; DeepSeek keeps this state in fp32 too), everything else in the cache dtype.
"""

from __future__ import annotations

import torch

from workbench.config import CSA, CSA_RATIO, ModelConfig


class CompressorState:
    """One compressor's running state: the open window, the overlap half (CSA) and the entries emitted so far."""

    def __init__(self, batch: int, max_len: int, rate: int, width: int, overlap: bool, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        c = 2 if overlap else 1
        self.rate, self.width, self.overlap = rate, width, overlap
        self.buffer_kv = torch.zeros(batch, rate, c * width, dtype=dtype, device=device)  # [B, m, c*d]
        self.buffer_gate = torch.zeros(batch, rate, c * width, dtype=torch.float32, device=device)  # [B, m, c*d]
        # CSA: Ca and Za (+ position bias) of the last closed window, the first half of the next entry's 2m slots
        self.overlap_kv = torch.zeros(batch, rate, width, dtype=dtype, device=device) if overlap else None
        self.overlap_gate = (torch.zeros(batch, rate, width, dtype=torch.float32, device=device)
                             if overlap else None)  # [B, m, d]
        self.entries = torch.zeros(batch, max_len // rate, width, dtype=dtype, device=device)  # [B, N_max, d]

    def entry_count(self, length: int) -> int:
        return length // self.rate

    def nbytes_used(self, length: int) -> int:
        """Bytes holding live state after `length` tokens (all sequences of the batch)."""
        B = self.entries.shape[0]
        per_entry = self.width * self.entries.element_size()
        buffered = length % self.rate
        per_buffered = self.buffer_kv.shape[-1] * (self.buffer_kv.element_size() + self.buffer_gate.element_size())
        total = self.entry_count(length) * per_entry + buffered * per_buffered
        if self.overlap and length >= self.rate:
            total += self.rate * self.width * (self.buffer_kv.element_size() + 4)
        return B * total


class V4LayerCache:
    """One layer's state. `length` is the number of tokens already cached (kept in step by `V4Cache.advance`)."""

    def __init__(self, config: ModelConfig, layer: int, batch: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.layer, self.kind = layer, config.attention_kind(layer)
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.window_size = config.sliding_window
        d = config.head_dim
        self.window = torch.zeros(batch, config.sliding_window - 1, d, dtype=dtype, device=device)  # [B, W-1, d]
        m = config.compress_ratio(layer)
        self.compressor = (CompressorState(batch, max_len, m, d, m == CSA_RATIO, dtype=dtype, device=device)
                           if m else None)
        self.indexer = (CompressorState(batch, max_len, m, config.index_head_dim, True, dtype=dtype, device=device)
                        if self.kind == CSA else None)

    def check(self, batch: int, new: int) -> None:
        """Raise unless `new` tokens of a batch of `batch` fit after what is cached."""
        if batch != self.batch:
            raise ValueError(f"V4 cache of layer {self.layer} holds batch {self.batch}, got batch {batch}")
        if self.length + new > self.max_len:
            raise ValueError(f"V4 cache full: {self.length} cached + {new} new > max_len {self.max_len}")

    def window_keys(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys the new tokens' windows can reach, and the position each holds.

        kv [B, S, d] (the new keys) -> keys [B, W-1 + S, d] = ring slots as stored, then the new keys, and
        positions [W-1 + S] int64 (-1: an empty slot). Then the new keys are written into the ring."""
        S, slots = kv.shape[1], self.window.shape[1]
        past = self.length
        keys = torch.cat([self.window, kv], dim=1)  # [B, W-1+S, d]: the ring is small, its copy constant-size
        slot = torch.arange(slots, device=kv.device)
        ring_pos = (past - 1) - (past - 1 - slot) % max(slots, 1)  # newest position stored in each slot
        ring_pos = torch.where(ring_pos >= 0, ring_pos, -1)
        positions = torch.cat([ring_pos, torch.arange(past, past + S, device=kv.device)])  # [W-1+S]
        if slots:
            keep = min(S, slots)
            new_pos = torch.arange(past + S - keep, past + S, device=kv.device)
            self.window[:, new_pos % slots] = kv[:, S - keep:]
        return keys, positions

    def step_keys(self, kv: torch.Tensor, window: int) -> torch.Tensor:
        """One new token's keys, kv [B, 1, d] at position t = `length` -> the keys its `window` reaches, [B, P, d]:
        the cached keys of positions t-P+1 .. t-1 (in ring-slot order: attention does not care about order), then
        the new key; P = min(window, t + 1), 0 for no window. Then the new key goes into the ring (always: the
        cache is kept whatever a run's window control)."""
        slots, t = self.window.shape[1], self.length
        reach = min(window - 1, t, slots)  # cached keys in the window
        if window <= 0:
            keys = kv[:, :0]
        elif reach == slots:  # the whole ring (every step once the prompt fills the window)
            keys = torch.cat([self.window, kv], dim=1)
        else:
            keys = torch.cat([self.window[:, [(t - 1 - i) % slots for i in range(reach)]], kv], dim=1)
        if slots:
            self.window[:, t % slots] = kv[:, 0]  # after the copy above: it may overwrite a key still in reach
        return keys

    def nbytes_used(self) -> int:
        window = min(self.length, self.window.shape[1]) * self.window.shape[-1] * self.window.element_size()
        total = self.batch * window
        for state in (self.compressor, self.indexer):
            if state is not None:
                total += state.nbytes_used(self.length)
        return total


class V4Cache:
    """The whole model's V4 state; `advance(n)` once per forward, after every layer has written its n tokens."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if not config.is_v4:
            raise ValueError(f"V4Cache needs a deepseek_v4 config, got model_type {config.model_type!r}")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache max_len={max_len} exceeds max_position_embeddings={config.max_position_embeddings}")
        if batch < 1 or max_len < 1:
            raise ValueError(f"V4Cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.layers = [V4LayerCache(config, i, batch, max_len, dtype=dtype, device=device)
                       for i in range(config.num_hidden_layers)]

    def layer(self, i: int) -> V4LayerCache:
        return self.layers[i]

    def advance(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"V4 cache full: {self.length} cached + {n} new > max_len {self.max_len}")
        self.length += n
        for layer in self.layers:
            layer.length = self.length

    def nbytes_used(self) -> int:
        return sum(layer.nbytes_used() for layer in self.layers)
