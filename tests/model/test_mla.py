"""Multi-head latent attention: the fused attention fast path against its plain reference."""

from __future__ import annotations

import pytest
import torch

from workbench.model.attention import attend


@pytest.mark.parametrize(("B", "S", "T", "nH", "kv_heads", "d", "dv"), [
    (2, 7, 7, 3, 3, 24, 16),  # naive MLA prefill: per-head keys, q·k (D+R) wider than V
    (1, 5, 13, 4, 1, 40, 32),  # absorbed MLA after 8 cached tokens: one latent key/value shared by all heads
    (3, 1, 9, 2, 1, 20, 16),  # a decode step
    (2, 6, 6, 2, 2, 8, 20),  # v wider than q·k: q and k are the ones padded
    (1, 1, 1, 2, 2, 16, 16),  # a single token, widths already equal
])
def test_fused_attention_equals_the_plain_reference(B, S, T, nH, kv_heads, d, dv):
    """The SDPA call (v or q/k zero-padded so CPU takes its flash kernel) against softmax(q k^T) v spelled out."""
    g = torch.Generator().manual_seed(S * 100 + T)
    q = torch.randn(B, S, nH, d, generator=g)
    k, v = torch.randn(B, T, kv_heads, d, generator=g), torch.randn(B, T, kv_heads, dv, generator=g)
    causal = None if S == T else torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)  # history before the block
    fused = attend(q, k, v, causal, 0.3)
    assert fused.shape == (B, S, nH, dv)
    torch.testing.assert_close(fused, attend(q, k, v, causal, 0.3, fused=False), atol=1e-5, rtol=1e-5)
    if S == T and S > 1:  # causality: the first query sees only the first key
        torch.testing.assert_close(fused[:, 0], v[:, 0].expand(B, nH, dv), atol=1e-5, rtol=1e-5)
