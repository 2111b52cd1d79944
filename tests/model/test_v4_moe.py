"""DeepSeek-V4's MoE: sqrt(softplus) scores, renormalisation for every k, hash routing (tid2eid), clamped SwiGLU in
routed and shared experts; against transformers' DeepseekV4SparseMoeBlock and against plain formulas, on every
expert path, and the backends that cannot clamp or score sqrtsoftplus refusing (explicit "triton") or falling back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.config import ModelConfig
from workbench.model.experts import MLP, Experts, experts_forward, swiglu
from workbench.model.moe import MoE
from workbench.model.quant import FP8Format, act_qdq, dequant_stacked, quantize_stacked
from workbench.model.routing import RouteOverride, RoutingParams, route
from workbench.probes import ProbeRegistry
from workbench_kernels.reference import hash_route_ref, route_ref, router_scores_ref

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as tf_v4  # noqa: E402

E, K, D, I, VOCAB = 8, 2, 64, 24, 96


def configs(scoring: str = "sqrtsoftplus", limit: float | None = 1.0, top_k: int = K) -> tuple[ModelConfig, object]:
    tf_cfg = transformers.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=D, moe_intermediate_size=I, num_hidden_layers=2,
        layer_types=["sliding_attention"] * 2, mlp_layer_types=["hash_moe", "moe"], num_attention_heads=4,
        head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=E,
        num_experts_per_tok=top_k, n_shared_experts=1, scoring_func=scoring, routed_scaling_factor=1.5,
        sliding_window=8, swiglu_limit=limit if limit is not None else 10.0, max_position_embeddings=128)
    cfg = ModelConfig.from_hf_dict(tf_cfg.to_dict())
    return (cfg if limit is not None else cfg.replace(swiglu_limit=None)), tf_cfg


def random_moe(cfg: ModelConfig, layer: int, seed: int) -> MoE:
    moe = MoE(cfg, layer, ProbeRegistry())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        if moe.gate.tid2eid is not None:  # random distinct experts per token
            moe.gate.tid2eid.copy_(torch.stack([torch.randperm(E, generator=gen)[: cfg.num_experts_per_tok]
                                                for _ in range(VOCAB)]))
        else:
            moe.gate.e_score_correction_bias.copy_(0.05 * torch.randn(E, generator=gen))
    return moe.eval()


def to_transformers(moe: MoE, tf_cfg: object, layer: int) -> torch.nn.Module:
    theirs = tf_v4.DeepseekV4SparseMoeBlock(tf_cfg, layer).eval()
    sd = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    sd["experts.gate_up_proj"] = torch.cat([moe.experts.gate_proj, moe.experts.up_proj], dim=1)  # [E, 2I, D]
    sd["experts.down_proj"] = moe.experts.down_proj
    theirs.load_state_dict(sd, strict=True)
    return theirs


def choice_margin(logits: torch.Tensor, bias: torch.Tensor, scoring: str, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th choice score over tokens: a tie would let the two top-k's differ."""
    top = (router_scores_ref(logits, scoring) + bias).sort(dim=-1, descending=True).values  # type: ignore[arg-type]
    return float((top[:, k - 1] - top[:, k]).min())


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "scored"])
def test_moe_matches_transformers(scoring: str, layer: int) -> None:
    cfg, tf_cfg = configs(scoring)
    moe = random_moe(cfg, layer, seed=layer + 7)
    theirs = to_transformers(moe, tf_cfg, layer)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, D, generator=gen)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    seen: dict[str, torch.Tensor] = {}
    theirs.gate.register_forward_hook(lambda _m, _a, out: seen.update(ids=out[2]))
    with torch.no_grad():
        want = theirs(x, input_ids=ids)
        got = moe(x, input_ids=ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    expect_ids = moe.gate.tid2eid[ids.reshape(-1)] if layer == 0 else None
    with torch.no_grad():
        logits = moe.gate.logits(x.reshape(-1, D))
    if layer == 1:
        assert choice_margin(logits, moe.gate.e_score_correction_bias, scoring, K) > 1e-4
        expect_ids = route_ref(logits, moe.gate.e_score_correction_bias, top_k=K, scoring_func=scoring,  # type: ignore[arg-type]
                               norm_topk_prob=True)[1]
    assert expect_ids is not None
    assert torch.equal(seen["ids"].sort(-1).values, expect_ids.sort(-1).values)


def test_the_clamp_fires_and_matters() -> None:
    """With swiglu_limit 1.0 and these weights the clamp is live: unclamped experts give another output."""
    cfg, _ = configs(limit=1.0)
    moe = random_moe(cfg, 1, seed=2)
    x = 3.0 * torch.randn(20, D, generator=torch.Generator().manual_seed(0))
    gate = F.linear(x, moe.shared_experts.gate_proj.weight)  # type: ignore[union-attr]
    assert (gate > 1.0).float().mean() > 0.1 and (gate.abs() <= 1.0).float().mean() > 0.1
    unclamped = MoE(cfg.replace(swiglu_limit=None), 1, ProbeRegistry())
    unclamped.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert (moe(x) - unclamped(x)).abs().max() > 1e-2


def test_swiglu_clamp_formula() -> None:
    g = torch.tensor([-5.0, -0.5, 0.5, 5.0])
    u = torch.tensor([-5.0, -0.5, 0.5, 5.0])
    want = F.silu(torch.tensor([-5.0, -0.5, 0.5, 1.0])) * torch.tensor([-1.0, -0.5, 0.5, 1.0])
    torch.testing.assert_close(swiglu(g, u, 1.0), want)
    torch.testing.assert_close(swiglu(g, u, None), F.silu(g) * u)
    mlp = MLP(4, 3, swiglu_limit=0.25)
    x = torch.randn(5, 4)
    with torch.no_grad():
        want_mlp = mlp.down_proj(F.silu(mlp.gate_proj(x).clamp(max=0.25)) * mlp.up_proj(x).clamp(-0.25, 0.25))
        torch.testing.assert_close(mlp(x), want_mlp)


@pytest.mark.parametrize("path", ["loop", "gather", "sorted", "padded"])
def test_every_expert_path_clamps(path: str) -> None:
    gen = torch.Generator().manual_seed(4)
    T, L = 9, 0.3
    x = torch.randn(T, D, generator=gen)
    wg, wu = 0.3 * torch.randn(E, I, D, generator=gen), 0.3 * torch.randn(E, I, D, generator=gen)
    wd = 0.3 * torch.randn(E, D, I, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen)
    want = torch.zeros(T, D)
    for t in range(T):
        for s in range(K):
            e = int(ids[t, s])
            h = F.silu((wg[e] @ x[t]).clamp(max=L)) * (wu[e] @ x[t]).clamp(-L, L)
            want[t] += weights[t, s] * (wd[e] @ h)
    got = experts_forward(x, ids, weights, wg, wu, wd, path=path, swiglu_limit=L)  # type: ignore[arg-type]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (experts_forward(x, ids, weights, wg, wu, wd, path=path) - want).abs().max() > 1e-3  # type: ignore[arg-type]


def test_fp8_experts_clamp_too() -> None:
    """The FP8 simulation path (torch) clamps: it equals DeepSeek's FP8 expert written out per (token, slot), with
    weights and activations quantize-dequantized and the clamp between the projections and the product."""
    gen = torch.Generator().manual_seed(5)
    T, L = 16, 0.3
    experts = Experts(E, D, I, swiglu_limit=L)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(T, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    f = FP8Format()
    experts.fp8 = f
    with torch.no_grad():
        got = experts(x, ids, w)
        wg, wu, wd = (dequant_stacked(*quantize_stacked(p, f)) for p in
                      (experts.gate_proj, experts.up_proj, experts.down_proj))
    xq = act_qdq(x, f)
    want = torch.zeros(T, D)
    for t in range(T):
        for slot in range(K):
            e = int(ids[t, slot])
            h = F.silu((wg[e] @ xq[t]).clamp(max=L)) * (wu[e] @ xq[t]).clamp(-L, L)
            want[t] += w[t, slot] * (wd[e] @ act_qdq(h[None], f)[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clamped_experts_refuse_the_triton_kernel_and_fall_back_on_auto() -> None:
    experts = Experts(E, D, I, swiglu_limit=1.0)
    torch.nn.init.normal_(experts.gate_proj)
    torch.nn.init.normal_(experts.up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x, ids, w = torch.randn(3, D), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K)
    experts.backend = "triton"
    with pytest.raises(ValueError, match="swiglu_limit"):
        experts(x, ids, w)
    experts.backend = "auto"
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, w), experts_forward(x, ids, w, experts.gate_proj, experts.up_proj,
                                                                       experts.down_proj, swiglu_limit=1.0))


def test_sqrtsoftplus_gate_refuses_the_triton_kernel() -> None:
    cfg, _ = configs("sqrtsoftplus")
    moe = random_moe(cfg, 1, seed=0)
    moe.gate.backend = "triton"
    with pytest.raises(ValueError, match="sqrtsoftplus"):
        moe(torch.randn(4, D))


def test_sqrtsoftplus_scores_and_renormalisation_for_every_k() -> None:
    logits = torch.randn(30, E, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(router_scores_ref(logits, "sqrtsoftplus"), torch.log1p(logits.exp()).sqrt())
    cfg, _ = configs(top_k=1)
    p = RoutingParams.from_config(cfg)
    assert p.norm_topk_prob and p.norm_single
    _, _, w = route(logits, None, p)
    torch.testing.assert_close(w, torch.full((30, 1), 1.5))  # one expert, renormalised to 1, times the scaling
    v3 = RoutingParams(1, 1, 1, "noaux_tc", "sigmoid", True, 1.5)  # V2/V3 rule: no renormalisation for k == 1
    s, ids, w3 = route(logits, None, v3)
    torch.testing.assert_close(w3, 1.5 * s.gather(1, ids))


def test_hash_route_formula_and_errors() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, E, generator=gen)
    ids = torch.tensor([[1, 4], [0, 7], [3, 2], [6, 5], [4, 1]])
    s, out_ids, w = hash_route_ref(logits, ids, routed_scaling_factor=2.0)
    want = s.gather(1, ids)
    torch.testing.assert_close(w, 2.0 * want / want.sum(-1, keepdim=True))
    assert torch.equal(out_ids, ids)
    mask = torch.ones(E, dtype=torch.bool)
    mask[4] = False
    _, _, wm = hash_route_ref(logits, ids, routed_scaling_factor=2.0, mask=mask)
    assert wm[0, 1] == 0 and wm[4, 0] == 0
    torch.testing.assert_close(wm[0, 0], torch.tensor(2.0))  # the kept expert takes the token's whole weight
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\)"):
        hash_route_ref(logits, ids + 4)
    with pytest.raises(ValueError, match="ids must be"):
        hash_route_ref(logits, ids[:3])


def test_hash_layer_without_token_ids_raises_naming_the_layer() -> None:
    cfg, _ = configs()
    moe = random_moe(cfg, 0, seed=0)
    with pytest.raises(ValueError, match="layer 0 is hash-routed.*needs the token ids"):
        moe(torch.randn(1, 3, D))


def test_hash_layer_overrides_change_weights_not_selection() -> None:
    cfg, _ = configs()
    moe = random_moe(cfg, 0, seed=1)
    x, tok = torch.randn(1, 6, D), torch.randint(0, VOCAB, (1, 6))
    p = RoutingParams.from_config(cfg)
    seen: dict[str, torch.Tensor] = {}
    moe.hook_expert_weights = ProbeRegistry().site("w")
    moe.hook_expert_weights.listeners.append((lambda _n, v: seen.update(w=v), None))
    mask = torch.ones(E, dtype=torch.bool)
    mask[int(moe.gate.tid2eid[tok[0, 0], 0])] = False  # type: ignore[index]
    with torch.no_grad():
        moe(x, RouteOverride(params=p, mask=mask, temperature=2.0), input_ids=tok)
    assert seen["w"][0, 0] == 0
    torch.testing.assert_close(seen["w"].sum(-1), torch.full((6,), 1.5))
    with pytest.raises(ValueError, match=r"layer 0 is hash-routed.*\['force'\]"):
        moe(x, RouteOverride(params=p, force=torch.tensor([3])), input_ids=tok)


def test_v4_parameter_names() -> None:
    cfg, tf_cfg = configs()
    for layer in (0, 1):
        ours = {k: tuple(v.shape) for k, v in MoE(cfg, layer, ProbeRegistry()).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in tf_v4.DeepseekV4SparseMoeBlock(tf_cfg, layer).state_dict().items()}
        theirs.pop("experts.gate_up_proj")
        assert {k: v for k, v in ours.items() if k not in ("experts.gate_proj", "experts.up_proj")} == theirs
        assert ours["experts.gate_proj"] == ours["experts.up_proj"] == (E, I, D)
    assert "gate.tid2eid" in MoE(cfg, 0, ProbeRegistry()).state_dict()
    assert "gate.e_score_correction_bias" not in MoE(cfg, 0, ProbeRegistry()).state_dict()
