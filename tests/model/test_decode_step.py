"""The decode step's fast paths against the general paths they replace (one token after a cached history, fp32).

Each is also covered end to end: `test_naive_absorb_and_incremental_decode_agree` holds a cached decode (these paths)
to a whole naive forward, and the comparisons against transformers run through them.
"""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.model.attention import attend, attend_latent_step
from workbench.model.norm import RMSNorm
from workbench.model.rope import Rotary
from workbench.model.transformer import DeepSeekModel


@pytest.mark.parametrize(("B", "T", "nH", "C", "R"), [(1, 1, 2, 8, 4), (3, 40, 8, 64, 16), (2, 200, 16, 512, 64)])
def test_the_latent_step_equals_attention_over_the_concatenated_key(B, T, nH, C, R):
    g = torch.Generator().manual_seed(T)
    q_latent, q_pe = torch.randn(B, nH, C, generator=g), torch.randn(B, nH, R, generator=g)
    c_kv, k_pe = torch.randn(B, T, C, generator=g), torch.randn(B, T, R, generator=g)
    scale = (C + R) ** -0.5
    got = attend_latent_step(q_latent, q_pe, c_kv, k_pe, scale)  # [B, nH, C]
    query = torch.cat([q_latent, q_pe], dim=-1)[:, None]  # [B, 1, nH, C+R]
    key = torch.cat([c_kv, k_pe], dim=-1)[:, :, None]  # [B, T, 1, C+R]
    every_key = torch.ones(1, T, dtype=torch.bool)
    want = attend(query, key, c_kv[:, :, None], every_key, scale, fused=False)[:, 0]  # [B, nH, C]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("position", [0, 7, 1000])
def test_one_position_rotates_by_a_matrix_as_the_elementwise_rotation_does(interleaved, position):
    cfg = PRESETS["tiny"].replace(rope_interleave=interleaved,
                                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    rotary = Rotary(cfg)
    cos, sin = rotary.cos_sin(torch.tensor([position]))  # [1, R/2]
    g = torch.Generator().manual_seed(position)
    for x in (torch.randn(3, 1, 4, cfg.qk_rope_head_dim, generator=g), torch.randn(3, 1, cfg.qk_rope_head_dim,
                                                                                 generator=g)):
        torch.testing.assert_close(rotary.apply(x, cos, sin), rotary.apply_elementwise(x, cos, sin),
                                   atol=1e-6, rtol=1e-6)
    assert rotary.rotation_matrix(cos, sin) is rotary.rotation_matrix(cos, sin)  # built once per step
    other = rotary.cos_sin(torch.tensor([position + 1]))
    assert rotary.rotation_matrix(*other) is not rotary.rotation_matrix(cos, sin)


def test_rmsnorm_in_fp32_equals_the_formula_and_other_dtypes_keep_the_cast():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * 3
    want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=1e-6)
    half = norm.to(torch.bfloat16)  # normalised in fp32, cast back, then scaled, as DeepSeek's RMSNorm
    xb = x.bfloat16()
    x32 = xb.float()
    want_b = half.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(half(xb), want_b)


def test_the_untied_lm_head_is_column_major_through_init_loading_and_dtype_changes(tmp_path):
    from workbench.checkpoint import load_checkpoint, save_checkpoint

    model = DeepSeekModel.random(PRESETS["tiny"], seed=3)
    w = model.lm_head.weight  # [V, H] held as [H, V] in memory: a decode step's gemv streams it
    assert w.shape == (model.config.vocab_size, model.config.hidden_size) and w.t().is_contiguous()
    assert model.to(torch.bfloat16).lm_head.weight.t().is_contiguous()
    model = model.float()
    save_checkpoint(model, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.lm_head.weight.t().is_contiguous()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    tied = DeepSeekModel.random(PRESETS["tiny"].replace(tie_word_embeddings=True), seed=3)
    assert tied.lm_head.weight is tied.embed_tokens.weight  # tied: the embedding's row-major table, shared


def test_a_cached_decode_through_the_fast_paths_matches_the_general_absorbed_path():
    model = DeepSeekModel.random(PRESETS["tiny"], seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache(2, 14)
        steps = [model(ids[:, :6], cache=cache, mode="absorb")]
        steps += [model(ids[:, t : t + 1], cache=cache, mode="absorb") for t in range(6, 14)]  # the step paths
        whole = model(ids, mode="absorb")  # S > 1: the general absorbed path, elementwise rope, SDPA
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-4, rtol=1e-4)
