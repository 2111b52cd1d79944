"""mHC (workbench.model.v4.hyper) against transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead and against
plain formulas: Sinkhorn's doubly stochastic result, X' = post (x) y + M^T X written as a loop, the probe site."""

from __future__ import annotations

import pytest
import torch

from workbench.config import ModelConfig
from workbench.model.v4.hyper import (
    HyperConnection,
    HyperHead,
    collapse,
    expand,
    mix_matrix,
    sinkhorn,
    sinkhorn_numpy,
    sinkhorn_tokens_last,
)
from workbench.probes import ProbeRegistry

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as tf_v4  # noqa: E402


def configs(hc_mult: int, iters: int = 20) -> tuple[ModelConfig, object]:
    tf_cfg = transformers.DeepseekV4Config(
        vocab_size=96, hidden_size=64, moe_intermediate_size=24, num_hidden_layers=1, layer_types=["sliding_attention"],
        mlp_layer_types=["moe"], num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2,
        o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, sliding_window=8, hc_mult=hc_mult,
        hc_sinkhorn_iters=iters, hc_eps=1e-6, rms_norm_eps=1e-6, max_position_embeddings=128)
    return ModelConfig.from_hf_dict(tf_cfg.to_dict()), tf_cfg


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("base"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("hc_mult", [1, 2, 4])
def test_hyper_connection_matches_transformers(hc_mult: int) -> None:
    cfg, tf_cfg = configs(hc_mult)
    ours = HyperConnection(cfg, ProbeRegistry(), "blocks.0.hc_attn")
    randomize(ours, seed=hc_mult)
    theirs = tf_v4.DeepseekV4HyperConnection(tf_cfg)
    theirs.load_state_dict(ours.state_dict())
    X = torch.randn(2, 5, hc_mult, 64, generator=torch.Generator().manual_seed(1))
    u, post, mix = ours(X)
    t_post, t_comb, t_u = theirs(X)
    torch.testing.assert_close(u, t_u, rtol=0, atol=1e-6)
    torch.testing.assert_close(post, t_post, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix, t_comb, rtol=0, atol=1e-6)
    y = torch.randn(2, 5, 64)
    # the decoder layer's own update (transformers' DeepseekV4DecoderLayer.forward, written out)
    t_next = t_post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(t_comb.transpose(-1, -2), X)
    torch.testing.assert_close(expand(X, y, post, mix), t_next, rtol=0, atol=1e-5)


def test_hyper_head_matches_transformers() -> None:
    cfg, tf_cfg = configs(4)
    ours = HyperHead(cfg)
    randomize(ours, seed=3)
    theirs = tf_v4.DeepseekV4HyperHead(tf_cfg)
    theirs.load_state_dict(ours.state_dict())
    X = torch.randn(3, 7, 4, 64)
    torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=1e-6)


def test_hyper_parameter_names_and_shapes_are_transformers() -> None:
    cfg, tf_cfg = configs(4)
    ours = HyperConnection(cfg, ProbeRegistry(), "blocks.0.hc_attn")
    theirs = tf_v4.DeepseekV4HyperConnection(tf_cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    head, t_head = HyperHead(cfg), tf_v4.DeepseekV4HyperHead(tf_cfg)
    assert {k: v.shape for k, v in head.state_dict().items()} == {k: v.shape for k, v in t_head.state_dict().items()}


def test_sinkhorn_is_doubly_stochastic() -> None:
    eps = 1e-6
    m = torch.rand(50, 4, 4, dtype=torch.float64) + 0.05
    out = sinkhorn(m, iters=20, eps=eps)
    # ends on a column step: columns sum to 1/(1 + eps/colsum), i.e. 1 within ~eps
    torch.testing.assert_close(out.sum(-2), torch.ones(50, 4, dtype=torch.float64), rtol=0, atol=4 * eps)
    # rows after 20 alternations of these well-conditioned matrices: converged far below 1e-3
    torch.testing.assert_close(out.sum(-1), torch.ones(50, 4, dtype=torch.float64), rtol=0, atol=1e-3)
    assert (out > 0).all()
    # one iteration is one column normalisation, nothing more
    torch.testing.assert_close(sinkhorn(m, 1, eps), m / (m.sum(-2, keepdim=True) + eps))
    # a doubly stochastic input is (nearly) a fixed point
    perm = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]] * 0.7 + 0.3 / 4
    torch.testing.assert_close(sinkhorn(perm, 20, eps), perm, rtol=0, atol=1e-5)


def test_expand_is_post_times_y_plus_transposed_mix() -> None:
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(1, 2, 3, 5, generator=gen), torch.randn(1, 2, 5, generator=gen)
    post = torch.rand(1, 2, 3, generator=gen)
    mix = torch.rand(1, 2, 3, 3, generator=gen)  # not symmetric: M vs M^T would differ
    want = torch.zeros_like(X)
    for s in range(2):
        for k in range(3):
            want[0, s, k] = post[0, s, k] * y[0, s] + sum(mix[0, s, j, k] * X[0, s, j] for j in range(3))
    torch.testing.assert_close(expand(X, y, post, mix), want)
    assert not torch.allclose(expand(X, y, post, mix.transpose(-1, -2)), want)
    # the one-bmm layout against the broadcasting matmul it replaces, on the strided mixes Sinkhorn hands over
    X4, y4 = torch.randn(2, 300, 4, 64, generator=gen), torch.randn(2, 300, 64, generator=gen)
    post4 = torch.rand(2, 300, 4, generator=gen)
    mix4 = torch.rand(4, 4, 2, 300, generator=gen).permute(2, 3, 0, 1)  # [B, S, n, n], tokens-last strides
    plain = post4.unsqueeze(-1) * y4.unsqueeze(-2) + torch.matmul(mix4.transpose(-1, -2), X4)
    torch.testing.assert_close(expand(X4, y4, post4, mix4), plain, atol=1e-6, rtol=1e-6)
    pre = torch.rand(1, 2, 3, generator=gen)
    torch.testing.assert_close(collapse(X, pre), (pre[..., None] * X).sum(2))


def test_one_stream_mixes_by_one() -> None:
    cfg, _ = configs(1)
    hc = HyperConnection(cfg, ProbeRegistry(), "x")
    randomize(hc, seed=0)
    _, _, mix = hc(torch.randn(2, 3, 1, 64))
    torch.testing.assert_close(mix, torch.ones_like(mix), rtol=0, atol=1e-5)


def test_mix_probe_sees_and_replaces_the_sinkhorn_matrix() -> None:
    cfg, _ = configs(4)
    probes = ProbeRegistry()
    hc = HyperConnection(cfg, probes, "blocks.2.hc_ffn")
    randomize(hc, seed=1)
    X = torch.randn(1, 3, 4, 64)
    seen: list[torch.Tensor] = []
    with probes.listen(["blocks.2.hc_ffn.hook_mix"], lambda _name, v: seen.append(v)):
        _, _, mix = hc(X)
    assert len(seen) == 1 and seen[0].shape == (1, 3, 4, 4)
    torch.testing.assert_close(seen[0], mix)
    eye = torch.eye(4).expand(1, 3, 4, 4)
    with probes.listen(["blocks.2.hc_ffn.hook_mix"], lambda _name, v: eye):
        _, _, replaced = hc(X)
    torch.testing.assert_close(replaced, eye)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 16, 700])
def test_the_fast_sinkhorns_are_the_torch_one_bit_for_bit(n: int, tokens: int) -> None:
    for seed in range(5):
        g = torch.Generator().manual_seed(n * 100 + tokens * 10 + seed)
        m = torch.softmax(torch.randn(2, tokens, n, n, generator=g) * 3, dim=-1) + 1e-6
        want = sinkhorn(m, 20, 1e-6)
        if n <= 4:  # the streams V4 has; wider rows are summed in another order by numpy, so they stay on torch
            assert torch.equal(sinkhorn_numpy(m, 20, 1e-6), want)
            assert torch.equal(sinkhorn_tokens_last(m, 20, 1e-6), want)
        assert torch.equal(mix_matrix(m, 20, 1e-6), want)  # whichever path it takes
    trained = m.clone().requires_grad_(True)  # autograd never takes the numpy path
    out = mix_matrix(trained, 20, 1e-6)
    assert out.grad_fn is not None and torch.equal(out.detach(), want)
    out.sum().backward()  # the tokens-last layout's out-of-place steps backpropagate
    assert trained.grad is not None and torch.isfinite(trained.grad).all()
