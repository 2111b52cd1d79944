"""V4's KV compressors: learned gated pooling of every m tokens into one entry (paper §2.3; brief §2.4).

Shape legend: B batch, S new tokens, D hidden, d entry width (head_dim, or index_head_dim for the indexer's own
compressor), m compress rate, c = 2 (overlapping, CSA) or 1 (HCA), n windows closed in this call, N all entries.

Per token: C = kv_proj(x) and Z = gate_proj(x) + position_bias[slot], slot = position % m (fp32 gate).
- HCA (non-overlapping, any m != 4): entry w = kv_norm(Σ_i softmax_i(Z) ⊙ C) over the m tokens of window w,
  softmax per channel.
- CSA (overlapping, m = 4): C and Z are 2d wide, [a | b]. Entry w pools 2m slots: the a-halves of window w-1 and
  the b-halves of window w (width 2m, stride m). Window -1 does not exist: its slots get gate -inf (weight 0).
Each entry is then rotated by the "compress" RoPE at position w·m (its window's first token). Query t may use
entry w iff w < (t+1) // m (its window is complete by t); that rule lives with the attention and indexer.
With a cache, tokens of a window still open wait in the layer's `CompressorState`; the entries a call produces
are the same whether the sequence arrives at once, in chunks or token by token.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import CSA_RATIO
from workbench.model.norm import RMSNorm
from workbench.model.v4.cache import CompressorState
from workbench.model.v4.fake_quant import kv_fp8_fake_quant
from workbench.model.v4.rope import V4Rotary
from workbench.probes import ProbeSite


class Compressor(nn.Module):
    """The pooling weights and norm of one compressor (the main attention's; the indexer subclasses it)."""

    def __init__(self, hidden: int, width: int, rate: int, eps: float, rotary: V4Rotary,
                 weights_site: ProbeSite | None = None) -> None:
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, rate == CSA_RATIO
        c = 2 if self.overlap else 1
        self.kv_proj = nn.Linear(hidden, c * width, bias=False)
        self.gate_proj = nn.Linear(hidden, c * width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, c * width, dtype=torch.float32))  # [m, c*d]
        self.kv_norm = RMSNorm(width, eps)
        self.rotary = rotary  # the "compress" table
        self.weights_site = weights_site  # blocks.{L}.attn.hook_compress_weights (main compressor only)

    def compress(self, x: torch.Tensor, past: int, state: CompressorState | None, *,
                 simulate: bool = False) -> torch.Tensor:
        """The new tokens x [B, S, D] (positions past .. past+S-1) -> every entry so far [B, N, d], N = (past+S)//m.

        Without a state the call must start the sequence (past = 0) and a trailing partial window is dropped.
        `simulate`: DeepSeek's quantization simulation of the entries (`finish`; off in transformers)."""
        if state is not None and x.shape[1] == 1:
            return self._compress_one(x, past, state, simulate)
        return self.compress_any(x, past, state, simulate=simulate)

    def compress_any(self, x: torch.Tensor, past: int, state: CompressorState | None, *,
                     simulate: bool = False) -> torch.Tensor:
        """`compress` for any number of new tokens: the general path (the reference of the one-token path)."""
        B, S, _ = x.shape
        m = self.rate
        kv = self.kv_proj(x)  # [B, S, c*d]
        slots = torch.arange(past, past + S, device=x.device) % m
        gate = self.gate_proj(x).float() + self.position_bias[slots]  # [B, S, c*d] fp32
        first = past // m  # the window the first new token belongs to
        if state is None:
            if past:
                raise ValueError(f"a compressor without cache state must start at position 0, got {past}")
            prior = None
        else:
            held = past % m  # tokens of window `first` already buffered
            kv = torch.cat([state.buffer_kv[:, :held], kv], dim=1)  # [B, held+S, c*d]
            gate = torch.cat([state.buffer_gate[:, :held], gate], dim=1)
            prior = (state.overlap_kv, state.overlap_gate) if self.overlap and first > 0 else None
        n = kv.shape[1] // m
        closed_kv, closed_gate = kv[:, : n * m], gate[:, : n * m]  # [B, n*m, c*d]
        if state is not None:
            rest = kv.shape[1] - n * m
            state.buffer_kv[:, :rest] = kv[:, n * m :]
            state.buffer_gate[:, :rest] = gate[:, n * m :]
        if n == 0:
            new = kv.new_zeros(B, 0, self.width)
        else:
            new = self._pool(closed_kv.unflatten(1, (n, m)), closed_gate.unflatten(1, (n, m)), prior)  # [B, n, d]
            cos, sin = self.rotary.cos_sin((first + torch.arange(n, device=x.device)) * m)
            new = self.finish(self.rotary.rotate(new, cos, sin), simulate=simulate)
            if state is not None and self.overlap:
                assert state.overlap_kv is not None and state.overlap_gate is not None
                state.overlap_kv.copy_(closed_kv[:, -m:, : self.width])
                state.overlap_gate.copy_(closed_gate[:, -m:, : self.width])
        if state is None:
            return new
        state.entries[:, first : first + n] = new
        return state.entries[:, : first + n]

    def _compress_one(self, x: torch.Tensor, past: int, state: CompressorState, simulate: bool) -> torch.Tensor:
        """`compress` for one new token with a cache (a decode step): the token goes straight into its slot of
        the open window's buffer, and only when it closes the window is that buffer pooled into an entry. The same
        ops on the same values as the general path (tested equal bit for bit), without its concatenations and
        buffer shuffles: about a third of its ops."""
        m = self.rate
        held, first = past % m, past // m  # the token's slot in window `first`
        state.buffer_kv[:, held] = self.kv_proj(x)[:, 0]  # [B, c*d]
        state.buffer_gate[:, held] = self.gate_proj(x)[:, 0].float() + self.position_bias[held]
        if held < m - 1:  # the window stays open
            return state.entries[:, :first]
        prior = (state.overlap_kv, state.overlap_gate) if self.overlap and first > 0 else None
        new = self._pool(state.buffer_kv[:, None], state.buffer_gate[:, None], prior)  # [B, 1, d]
        cos, sin = self.rotary.cos_sin(torch.full((1,), first * m, device=x.device))
        new = self.finish(self.rotary.rotate(new, cos, sin), simulate=simulate)
        if self.overlap:  # pooled above from the previous overlap: now this window's a-halves replace it
            assert state.overlap_kv is not None and state.overlap_gate is not None
            state.overlap_kv.copy_(state.buffer_kv[..., : self.width])
            state.overlap_gate.copy_(state.buffer_gate[..., : self.width])
        state.entries[:, first] = new[:, 0]
        return state.entries[:, : first + 1]

    def _pool(self, kv: torch.Tensor, gate: torch.Tensor,
              prior: tuple[torch.Tensor | None, torch.Tensor | None] | None) -> torch.Tensor:
        """kv [B, n, m, c*d], gate (fp32) likewise -> kv_norm'ed pooled entries [B, n, d] (before RoPE)."""
        B, n, m, _ = kv.shape
        d = self.width
        if self.overlap:  # 2m slots per entry: a-halves of the previous window, then b-halves of this one
            slot_kv = kv.new_zeros(B, n, 2 * m, d)
            slot_gate = gate.new_full((B, n, 2 * m, d), float("-inf"))
            slot_kv[:, :, m:], slot_gate[:, :, m:] = kv[..., d:], gate[..., d:]
            slot_kv[:, 1:, :m], slot_gate[:, 1:, :m] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
            if prior is not None:  # window `first - 1` closed in an earlier call
                assert prior[0] is not None and prior[1] is not None
                slot_kv[:, 0, :m], slot_gate[:, 0, :m] = prior[0], prior[1]
            kv, gate = slot_kv, slot_gate
        weights = gate.softmax(dim=2)  # [B, n, m or 2m, d] per-channel pooling weights, fp32
        if self.weights_site is not None:
            weights = self.weights_site(weights)
        pooled = (kv * weights.to(kv.dtype)).sum(dim=2)  # [B, n, d]
        return self.kv_norm(pooled).to(kv.dtype)

    def finish(self, entries: torch.Tensor, *, simulate: bool) -> torch.Tensor:
        """Last step on rotated entries [B, n, d]: DeepSeek's FP8 simulation of the non-rope channels if asked."""
        return kv_fp8_fake_quant(entries, self.rotary.dim) if simulate else entries
