"""The V4 cache: what it holds after a run (window ring, partial windows, overlap halves, entries), what it
costs, and what it refuses. Attention parity through the cache is in test_v4_attention.py."""

from __future__ import annotations

import pytest
import torch

from workbench.config import CSA, HCA, SLIDING, ModelConfig
from workbench.model.v4.attention import V4Attention
from workbench.model.v4.cache import V4Cache
from workbench.probes import ProbeRegistry

W, D, d, DI = 8, 64, 32, 16  # window, hidden, head_dim, index_head_dim


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def config() -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=96, hidden_size=D, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, n_routed_experts=8, num_experts_per_tok=2,
        scoring_func="sqrtsoftplus", first_k_dense_replace=0, q_lora_rank=24, qk_rope_head_dim=8, head_dim=d,
        o_groups=2, o_lora_rank=16, sliding_window=W, compress_ratios=(0, 4, 8, 4), index_n_heads=16,
        index_head_dim=DI, index_topk=3, num_hash_layers=2, swiglu_limit=1.0, max_position_embeddings=128,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32})


def attentions(cfg: ModelConfig) -> list[V4Attention]:
    torch.manual_seed(0)
    layers = [V4Attention(cfg, i, ProbeRegistry()).eval() for i in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for attn in layers:
            for name, p in attn.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return layers


def run(cfg: ModelConfig, x: torch.Tensor, chunks: list[int]) -> V4Cache:
    cache = V4Cache(cfg, x.shape[0], 64)
    layers = attentions(cfg)
    start = 0
    for c in chunks:
        with torch.no_grad():
            for i, attn in enumerate(layers):
                attn(x[:, start : start + c], torch.arange(start, start + c), cache.layer(i), "fast")
        cache.advance(c)
        start += c
    return cache


def test_state_after_40_tokens_holds_the_window_and_every_entry():
    cfg = config()
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(0))
    cache = run(cfg, x, [13, 17] + [1] * 10)
    assert cache.length == 40 and [c.length for c in cache.layers] == [40] * 4
    assert [c.kind for c in cache.layers] == [SLIDING, CSA, HCA, CSA]
    assert cache.layer(0).compressor is None and cache.layer(0).indexer is None
    layers = attentions(cfg)
    for i in (1, 2, 3):
        layer, attn = cache.layer(i), layers[i]
        m = cfg.compress_ratio(i)
        assert layer.compressor is not None and attn.compressor is not None
        assert layer.compressor.entry_count(40) == 40 // m  # CSA 10, HCA 5
        with torch.no_grad():
            whole = attn.compressor.compress(x, 0, None)  # the same entries from the whole sequence at once
        assert whole.shape == (2, 40 // m, d)
        torch.testing.assert_close(layer.compressor.entries[:, : 40 // m], whole, atol=1e-6, rtol=1e-6)
        assert (layer.compressor.entries[:, 40 // m :] == 0).all()  # preallocated, not yet written
        if cfg.attention_kind(i) == CSA:
            assert layer.indexer is not None and attn.indexer is not None
            with torch.no_grad():
                keys = attn.indexer.compress(x, 0, None)
            torch.testing.assert_close(layer.indexer.entries[:, :10], keys, atol=1e-6, rtol=1e-6)
            assert layer.indexer.entries.shape == (2, 64 // 4, DI)
            # the overlap half = a-halves of the last closed window (tokens 36..39), gate with its position bias
            assert layer.compressor.overlap_kv is not None and layer.compressor.overlap_gate is not None
            with torch.no_grad():
                ca = attn.compressor.kv_proj(x[:, 36:40])[..., :d]
                za = attn.compressor.gate_proj(x[:, 36:40])[..., :d] + attn.compressor.position_bias[:, :d]
            torch.testing.assert_close(layer.compressor.overlap_kv, ca)
            torch.testing.assert_close(layer.compressor.overlap_gate, za)
    # the ring holds the keys of positions 33..39 in slots p % 7
    attn = layers[0]
    with torch.no_grad():
        cos, sin = attn.rotary.cos_sin(torch.arange(40))
        kv = attn.rotary.rotate(attn.kv_norm(attn.kv_proj(x)), cos, sin)  # [2, 40, d]
    ring = cache.layer(0).window
    assert ring.shape == (2, W - 1, d)
    for p in range(33, 40):
        torch.testing.assert_close(ring[:, p % (W - 1)], kv[:, p], atol=1e-6, rtol=1e-6)


def test_one_token_compression_equals_the_general_path_bit_for_bit():
    """A decode step's compressor path (the token written into its buffer slot, a closing window pooled from the
    buffer) against `compress_any` on the same tokens and state: the same ops, so the same bits; CSA (overlapping,
    its indexer too) and HCA, across several window closings."""
    import copy

    cfg = config()
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(4))
    layers = attentions(cfg)
    for i in (1, 2):
        for comp in (layers[i].compressor, layers[i].indexer):
            if comp is None:
                continue
            fast = V4Cache(cfg, 2, 64).layer(i)
            state = fast.indexer if comp is layers[i].indexer else fast.compressor
            assert state is not None
            with torch.no_grad():
                comp.compress(x[:, :5], 0, state)  # a prefill leaves a window open
                ref_state = copy.deepcopy(state)
                for t in range(5, 21):
                    got = comp.compress(x[:, t : t + 1], t, state)
                    want = comp.compress_any(x[:, t : t + 1], t, ref_state)
                    assert torch.equal(got, want), (i, t)
                    held = (t + 1) % comp.rate
                    assert torch.equal(state.buffer_kv[:, :held], ref_state.buffer_kv[:, :held])
                    assert torch.equal(state.buffer_gate[:, :held], ref_state.buffer_gate[:, :held])
                    if comp.overlap:
                        assert torch.equal(state.overlap_kv, ref_state.overlap_kv)
                        assert torch.equal(state.overlap_gate, ref_state.overlap_gate)
            assert got.shape[1] == 21 // comp.rate  # CSA 5 entries, HCA 2: windows closed during the steps


def test_partial_windows_wait_in_the_buffer():
    cfg = config()
    x = torch.randn(1, 30, D, generator=torch.Generator().manual_seed(1))
    cache = run(cfg, x, [13, 17])  # 30 tokens: CSA buffer 2 tokens (28, 29), HCA 6 (24..29)
    layers = attentions(cfg)
    for i, held in ((1, 2), (2, 6)):
        state, attn = cache.layer(i).compressor, layers[i].compressor
        assert state is not None and attn is not None
        with torch.no_grad():
            kv = attn.kv_proj(x[:, 30 - held : 30])
        torch.testing.assert_close(state.buffer_kv[:, :held], kv)
        assert state.entry_count(30) == 30 // cfg.compress_ratio(i)


def test_nbytes_used_counts_live_state():
    cfg = config()
    cache = V4Cache(cfg, 2, 64)
    assert cache.nbytes_used() == 0
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(2))
    cache = run(cfg, x, [40])
    f = 4  # fp32
    window = (W - 1) * d * f
    csa = 10 * d * f + 10 * DI * f + 4 * d * (f + 4) + 4 * DI * (f + 4)  # entries + overlap halves, no buffer
    hca = 5 * d * f
    assert cache.nbytes_used() == 2 * (4 * window + 2 * csa + hca)
    # a partial window adds its buffered projections (kv in the cache dtype, gate fp32)
    cache = run(cfg, x[:, :6], [6])
    per_layer_window = 6 * d * f
    csa = 1 * d * f + 1 * DI * f + 2 * (2 * d) * (f + 4) + 2 * (2 * DI) * (f + 4) + 4 * (d + DI) * (f + 4)
    hca = 6 * d * (f + 4)
    assert cache.nbytes_used() == 2 * (4 * per_layer_window + 2 * csa + hca)


def test_bad_caches_are_refused():
    cfg = config()
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        V4Cache(cfg, 1, 1000)
    with pytest.raises(ValueError, match="needs a deepseek_v4 config"):
        V4Cache(ModelConfig(), 1, 16)
    with pytest.raises(ValueError, match="batch >= 1"):
        V4Cache(cfg, 0, 16)
    cache = V4Cache(cfg, 1, 16)
    cache.advance(16)
    with pytest.raises(ValueError, match="cache full"):
        cache.advance(1)
