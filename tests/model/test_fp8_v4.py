"""FP8 / FP4 simulation on DeepSeek-V4 (and V3.2's indexer): every linear is a site, the grouped output and the
FP4 experts equal plain formulas, the error probes report, and switching off restores the baseline exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import CSA, PRESETS, ModelConfig
from workbench.controls import Controls
from workbench.model.experts import Experts
from workbench.model.fp8 import (
    FP4Experts,
    FP8GroupedLinear,
    disable_fp8,
    enable_fp8,
    fp8_sites,
    layer_sites,
    layer_sites_from_config,
)
from workbench.model.fp8_linear import FP8Linear
from workbench.model.quant import FP8Format
from workbench.model.transformer import DeepSeekModel
from workbench.model.v4.attention import GroupedLinear
from workbench_kernels.reference import act_dequant_ref, act_quant_ref, weight_dequant_ref, weight_quant_ref

LIMIT = 1.0  # swiglu_limit low enough that the clamp fires on these weights


def v4_config(inner: int = 32) -> ModelConfig:
    """Every V4 layer kind: [sliding, CSA, HCA, CSA]; hidden and expert widths multiples of 32 (FP4 blocks)."""
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=96, hidden_size=64, moe_intermediate_size=inner, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, n_routed_experts=8, num_experts_per_tok=2,
        scoring_func="sqrtsoftplus", first_k_dense_replace=0, q_lora_rank=24, qk_rope_head_dim=8, head_dim=32,
        o_groups=2, o_lora_rank=16, sliding_window=8, compress_ratios=(0, 4, 8, 4), index_n_heads=16,
        index_head_dim=16, index_topk=3, num_hash_layers=2, swiglu_limit=LIMIT, max_position_embeddings=128)


def v4_model(cfg: ModelConfig | None = None) -> DeepSeekModel:
    model = DeepSeekModel.random(cfg or v4_config(), seed=0)
    with torch.no_grad():  # weights of std 0.15 (init's 0.02 leaves every activation near zero), norms near 1
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=gen))
    return model


def _ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(0))


def _expected_sites(cfg: ModelConfig) -> set[str]:
    names = set()
    for L in range(cfg.num_hidden_layers):
        names |= {f"blocks.{L}.attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")}
        if cfg.compress_ratio(L):
            names |= {f"blocks.{L}.attn.compressor.{p}" for p in ("kv_proj", "gate_proj")}
        if cfg.attention_kind(L) == CSA:
            names |= {f"blocks.{L}.attn.compressor.indexer.{p}" for p in ("q_b_proj", "kv_proj", "gate_proj")}
            names.add(f"blocks.{L}.attn.compressor.indexer.scorer.weights_proj")
        names |= {f"blocks.{L}.mlp.experts"} | {f"blocks.{L}.mlp.shared_experts.{p}"
                                                for p in ("gate_proj", "up_proj", "down_proj")}
    return names


@torch.no_grad()
def test_fp8_covers_every_v4_linear_and_switching_off_restores_the_baseline():
    cfg = v4_config()
    model = v4_model(cfg)
    params = {k: v.data_ptr() for k, v in model.state_dict().items()}
    base = model(_ids())
    for L in range(cfg.num_hidden_layers):
        assert layer_sites(model, L) == layer_sites_from_config(cfg, L)
    switched = enable_fp8(model)
    assert set(switched) == _expected_sites(cfg)
    # nothing high-precision is left in the blocks: every linear (the grouped output too) is simulated
    left = [n for n, m in model.layers.named_modules()
            if type(m) in (nn.Linear, GroupedLinear) or (isinstance(m, Experts) and m.fp8 is None)]
    assert left == []
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params  # same names, same tensors
    fp8 = model(_ids())
    rel = ((fp8 - base).norm() / base.norm()).item()
    # e4m3's 3 mantissa bits: ~3.5% per linear on random weights (the probes below). This random V4 turns that
    # into ~20% on the logits, as much as a random 3.7% perturbation of its attention weights alone does
    # (measured), because its softmaxes are sharp (q and kv are RMS-normed) and top-k choices flip
    assert 1e-3 < rel < 0.5
    errors: dict[str, torch.Tensor] = {}
    with model.probes.listen(["blocks.*.hook_fp8_rel_error"], lambda n, v: errors.__setitem__(n, v)):
        model(_ids())
    assert {n.removesuffix(".hook_fp8_rel_error") for n in errors} == _expected_sites(cfg)
    assert errors["blocks.1.attn.o_a_proj.hook_fp8_rel_error"].shape == (2, 20)  # per token
    assert errors["blocks.1.mlp.experts.hook_fp8_rel_error"].shape == (40,)  # per token, flattened
    for name, e in errors.items():
        assert 0.005 < e.mean() < 0.1, name
    disable_fp8(model)
    assert not list(fp8_sites(model))
    assert not any(isinstance(m, FP8Linear | FP4Experts) for m in model.modules())
    assert torch.equal(model(_ids()), base)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_grouped_linear_equals_the_kernel_references(ue8m0):
    g = torch.Generator().manual_seed(3)
    groups, rank, K = 3, 48, 200  # neither dim a multiple of 128: blocks straddle groups, as in a small wo_a
    grouped = GroupedLinear(K, rank, groups)
    x = torch.randn(2, 5, groups, K, generator=g)
    fp8 = FP8GroupedLinear(grouped.weight, FP8Format("e4m3", ue8m0), groups)
    assert fp8.weight is grouped.weight
    w = weight_dequant_ref(*weight_quant_ref(grouped.weight.detach(), ue8m0=ue8m0))  # [g*r, K], 128x128 blocks
    expected = torch.stack([act_dequant_ref(*act_quant_ref(x[:, :, i], ue8m0=ue8m0))
                            @ w[i * rank:(i + 1) * rank].T for i in range(groups)], dim=2)  # [2, 5, g, r]
    with torch.no_grad():
        torch.testing.assert_close(fp8(x), expected, atol=1e-5, rtol=1e-5)  # summation order only
        back = fp8.to_linear()
        assert type(back) is GroupedLinear and back.weight is grouped.weight


def _fp4_plain(w: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 by its definition: per 32 inputs a scale 2^ceil(log2(amax / 6)), each value to the nearest of
    ±{0, .5, 1, 1.5, 2, 3, 4, 6} times it (random weights: exact ties do not occur)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    blocks = w.unflatten(-1, (-1, 32))  # [..., G, 32]
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 6)))
    v = blocks / scale
    nearest = grid[(v.abs()[..., None] - grid).abs().argmin(-1)]
    return (torch.sign(v) * nearest * scale).flatten(-2)


@torch.no_grad()
def test_fp4_experts_equal_a_plain_formula():
    model = v4_model()
    enable_fp8(model, layers=[2], sites="experts", experts="fp4", ue8m0=True)
    experts = model.layers[2].mlp.experts
    assert isinstance(experts, FP4Experts) and experts.fp8 == FP8Format("e4m3", True)
    gen = torch.Generator().manual_seed(4)
    T, H, E, k = 9, 64, 8, 2
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen)

    def fp8_act(v: torch.Tensor) -> torch.Tensor:  # FP8 e4m3 per 1x128 tile, power-of-two scales
        return act_dequant_ref(*act_quant_ref(v, ue8m0=True))

    w1, w3, w2 = (_fp4_plain(w) for w in (experts.gate_proj, experts.up_proj, experts.down_proj))
    expected = torch.zeros(T, H)
    for t in range(T):
        xq = fp8_act(x[t])
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (w1[e] @ xq).clamp(max=LIMIT), (w3[e] @ xq).clamp(-LIMIT, LIMIT)
            expected[t] += weights[t, j] * (w2[e] @ fp8_act(F.silu(gate) * up))
    torch.testing.assert_close(experts(x, ids, weights), expected, atol=1e-5, rtol=1e-5)
    assert float((w1 @ torch.ones(H)).abs().max()) > LIMIT  # the clamp is live


@torch.no_grad()
def test_fp4_probe_reports_fp4_error_and_fp4_weights_stay_fp4():
    model = v4_model()
    fp8_err: dict[str, torch.Tensor] = {}
    for fmt, store in (("fp8", fp8_err), ("fp4", {})):
        enable_fp8(model, sites="experts", experts=fmt)
        with model.probes.listen(["blocks.*.mlp.experts.hook_fp8_rel_error"], lambda n, v, s=store: s.__setitem__(n, v)):
            model(_ids())
        disable_fp8(model)
        if fmt == "fp4":
            fp4_err = store
    for name, e in fp4_err.items():
        # e2m1 keeps 1 mantissa bit: ~10% RMS per weight vs e4m3's ~3%; the probes must tell them apart
        assert 0.03 < e.mean() < 0.3 and e.mean() > 2 * fp8_err[name].mean(), name
    experts = model.layers[1].mlp.experts
    with torch.no_grad():  # weights already on the FP4 grid (a dequantized FP4 checkpoint) come back unchanged
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(experts, name).copy_(_fp4_plain(getattr(experts, name)))
    enable_fp8(model, layers=[1], sites="experts", experts="fp4")
    fp4 = model.layers[1].mlp.experts
    assert all(torch.equal(q, w) for q, w in zip(fp4.fp4_weights(), (experts.gate_proj, experts.up_proj,
                                                                      experts.down_proj), strict=True))


@torch.no_grad()
def test_fp4_experts_switch_off_to_the_same_parameters():
    model = v4_model()
    base = model(_ids())
    before = model.layers[3].mlp.experts
    enable_fp8(model, sites="experts", experts="fp4")
    after = model.layers[3].mlp.experts
    assert isinstance(after, FP4Experts) and after.gate_proj is before.gate_proj
    assert not torch.equal(model(_ids()), base)
    enable_fp8(model, sites="experts", experts="fp8")  # already simulated: left as they are
    assert isinstance(model.layers[3].mlp.experts, FP4Experts)
    disable_fp8(model)
    plain = model.layers[3].mlp.experts
    assert type(plain) is Experts and plain.down_proj is before.down_proj
    assert torch.equal(model(_ids()), base)


def test_bad_fp4_requests_are_named_and_change_nothing():
    model = v4_model(v4_config(inner=24))
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(24\).*multiples of 32"):
        enable_fp8(model, experts="fp4")
    with pytest.raises(ValueError, match="experts must be 'fp8' or 'fp4'"):
        enable_fp8(model, experts="fp6")  # type: ignore[arg-type]
    assert not list(fp8_sites(model))


@torch.no_grad()
def test_v4_checkpoint_group_is_what_deepseek_stores_in_low_precision():
    cfg = v4_config()
    model = v4_model(cfg)
    switched = set(enable_fp8(model, sites="v4_checkpoint", ue8m0=True, experts="fp4"))
    # compressors, the indexer's key side and weights_proj are bf16 in DeepSeek's checkpoints
    assert switched == {n for n in _expected_sites(cfg) if ".compressor." not in n or n.endswith("indexer.q_b_proj")}
    assert isinstance(model.layers[0].mlp.experts, FP4Experts)


@torch.no_grad()
def test_run_controls_on_v4_sites_equal_enabling_them():
    cfg = v4_config()
    model = v4_model(cfg)
    sites = ["o_a_proj", "indexer_q", "compressor", "experts"]
    controls = Controls(fp8={1: sites}).resolve(cfg)
    assert controls[1].fp8_sites == frozenset(sites)
    run = model(_ids(), controls=controls)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())  # the shared model was not touched
    enable_fp8(model, layers=[1], sites=sites)
    torch.testing.assert_close(run, model(_ids()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="layer 0 has no"):
        Controls(fp8={0: ["compressor"]}).validate(cfg)  # a sliding-window layer has no compressor


@torch.no_grad()
def test_v32_indexer_sites():
    cfg = PRESETS["deepseek-v3.2"].replace(
        vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, index_n_heads=16, index_head_dim=16, index_topk=4,
        max_position_embeddings=256, rope_scaling=None)
    model = DeepSeekModel.random(cfg)
    switched = enable_fp8(model, sites="indexer")
    assert sorted(switched) == sorted(f"blocks.{L}.attn.indexer.{p}" for L in (0, 1)
                                      for p in ("wq_b", "wk", "weights_proj"))
    assert layer_sites(model, 1) == layer_sites_from_config(cfg, 1)
