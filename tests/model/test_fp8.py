"""FP8 simulation in the model: DeepSeek-V3's recipe, switched per site and layer, reversible, probed, and FP8
checkpoints kept as FP8."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.checkpoint import load_checkpoint, save_checkpoint
from workbench.config import PRESETS
from workbench.model.fp8 import disable_fp8, enable_fp8, fp8_sites
from workbench.model.fp8_linear import FP8Linear
from workbench.model.quant import FP8Format
from workbench.model.transformer import DeepSeekModel
from workbench_kernels.reference import act_quant_ref, fp8_gemm_ref, fused_moe_ref, weight_quant_ref


@pytest.fixture
def tiny():
    return DeepSeekModel.random(PRESETS["tiny"], seed=0)


def _ids(n=12):
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_fp8_error_is_small_nonzero_and_switching_off_restores_the_baseline(tiny):
    base = tiny(_ids())
    switched = enable_fp8(tiny)
    assert "blocks.1.mlp.experts" in switched and "blocks.0.mlp.down_proj" in switched
    fp8 = tiny(_ids())
    rel = ((fp8 - base).norm() / base.norm()).item()
    # e4m3 keeps 3 mantissa bits: each operand element is off by up to 2^-4 relative, so one linear's output is
    # off by ~3-4% RMS on random weights (measured by the probes below); 3 layers of it give ~5% on the logits
    # of this random model. (DeepSeek's <0.25% is on trained models' loss, not on random logits.)
    assert 1e-3 < rel < 0.1
    errors = {}
    with tiny.probes.listen(["blocks.*.hook_fp8_rel_error"], lambda n, v: errors.__setitem__(n, v)):
        tiny(_ids())
    assert errors["blocks.0.attn.q_a_proj.hook_fp8_rel_error"].shape == (2, 12)
    assert errors["blocks.1.mlp.experts.hook_fp8_rel_error"].shape == (24,)
    for name, e in errors.items():
        assert 0.005 < e.mean() < 0.1, name
    disable_fp8(tiny)
    assert not list(fp8_sites(tiny))
    assert all(type(m) is nn.Linear for m in tiny.modules() if isinstance(m, nn.Linear | FP8Linear))
    assert torch.equal(tiny(_ids()), base)
    enable_fp8(tiny)  # again: probe sites are reused, not registered twice
    assert torch.equal(tiny(_ids()), fp8)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_linear_equals_the_kernel_references(ue8m0):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(200, 300, bias=True)  # neither dim a multiple of 128: partial tiles and blocks
    x = torch.randn(3, 5, 200, generator=g)
    fp8 = FP8Linear.from_linear(lin, FP8Format("e4m3", ue8m0))
    assert fp8.weight is lin.weight
    wq, ws = weight_quant_ref(lin.weight.detach(), ue8m0=ue8m0)
    expected = fp8_gemm_ref(*act_quant_ref(x, ue8m0=ue8m0), wq, ws, out_dtype=torch.float32) + lin.bias
    with torch.no_grad():
        assert torch.equal(fp8(x), expected)
        assert fp8.to_linear().weight is lin.weight


@torch.no_grad()
def test_fp8_experts_equal_the_fused_moe_reference(tiny):
    enable_fp8(tiny, layers=[1], sites="experts")
    experts = tiny.layers[1].mlp.experts
    g = torch.Generator().manual_seed(2)
    T, H, E, k = 37, 64, 16, 4
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    quant = [[weight_quant_ref(w[e]) for e in range(E)] for w in (experts.gate_proj, experts.up_proj, experts.down_proj)]
    q = [torch.stack([p[0] for p in ps]) for ps in quant]
    s = [torch.stack([p[1] for p in ps]) for ps in quant]
    expected = fused_moe_ref(x, *q, ids, weights, w_gate_scale=s[0], w_up_scale=s[1], w_down_scale=s[2])
    torch.testing.assert_close(experts(x, ids, weights), expected, atol=1e-5, rtol=1e-5)  # summation order only
    torch.testing.assert_close(experts(x[:2], ids[:2], weights[:2]), expected[:2], atol=1e-5, rtol=1e-5)  # decode


@torch.no_grad()
def test_per_layer_and_per_site_selection(tiny):
    base = tiny(_ids())
    switched = enable_fp8(tiny, layers=[1], sites=["attn", "shared_experts"])
    assert all(n.startswith("blocks.1.") for n in switched)
    assert "blocks.1.attn.kv_b_proj" in switched and "blocks.1.mlp.shared_experts.up_proj" in switched
    assert type(tiny.layers[0].self_attn.q_a_proj) is nn.Linear
    assert isinstance(tiny.layers[1].self_attn.q_a_proj, FP8Linear)
    assert tiny.layers[1].mlp.experts.fp8 is None
    assert not torch.equal(tiny(_ids()), base)
    with pytest.raises(KeyError):
        tiny.probes.resolve(["blocks.0.attn.q_a_proj.hook_fp8_rel_error"])
    # absorbed attention folds kv_b_proj's FP8-rounded weight into q and out (weight-only FP8, as DeepSeek's
    # inference does), so it differs from naive mode by the rounding of c_kv only
    absorb, naive = tiny(_ids(), mode="absorb"), tiny(_ids())
    assert 0 < ((absorb - naive).norm() / naive.norm()) < 0.1
    with pytest.raises(ValueError, match="unknown FP8 site"):
        enable_fp8(tiny, sites="lm_head")
    with pytest.raises(ValueError, match="outside"):
        enable_fp8(tiny, layers=[7])


@torch.no_grad()
def test_keep_fp8_loading_equals_dequantized_loading_with_fp8_weights(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    fp8 = {}
    for name, t in tensors.items():
        if name.endswith(("proj.weight", "mqa.weight")) and t.dim() == 2:  # attention, MLPs, experts, as V3 ships
            fp8[name], fp8[name + "_scale_inv"] = weight_quant_ref(t)
        else:
            fp8[name] = t
    save_file(fp8, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    dequantized = load_checkpoint(tmp_path)
    high = dequantized(_ids())
    enable_fp8(dequantized)  # re-quantizing the dequantized weights gives back the stored codes
    kept = load_checkpoint(tmp_path, keep_fp8=True)
    assert kept.layers[1].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert sorted(fp8_sites(kept)) == sorted(fp8_sites(dequantized))
    # scales may differ by an ulp (448 * s / 448), codes do not
    torch.testing.assert_close(kept(_ids()), dequantized(_ids()), atol=1e-6, rtol=1e-5)
    disable_fp8(kept)  # FP8 weights dequantized: the plain dequantized load, bit for bit
    assert torch.equal(kept(_ids()), high)
