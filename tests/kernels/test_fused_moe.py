"""Fused MoE kernel vs a per-expert loop in torch.

Tolerances:
- fp32: both sides are fp32 matmuls of the same numbers in a different order: rtol/atol 1e-5 (errors ~1e-6).
- bf16: both round the intermediate and the output to bf16; a fp32 ulp of difference can land on the other side
  of a bf16 rounding boundary, so elements may differ by about one bf16 ulp: rtol 2^-7, atol 2^-7 * max|y|.
- FP8: x's codes are bit-identical on both sides; the intermediate is re-quantized to e4m3, where a fp32 ulp
  of difference can move one code by one step (2^-3 of that element), one term among I >= 128 of an output:
  under 2^-7 of max|y| (observed: 2e-7 fp32, 9e-5 bf16). A wrong block scale or row is off by O(max|y|).
"""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.fused_moe import fused_moe, moe_align
from workbench_kernels.reference import fused_moe_ref, weight_quant_ref


def _problem(T, H, I, E, k, dtype, device):
    x = torch.randn(T, H, device=device).to(dtype)
    w_gate = (torch.randn(E, I, H, device=device) * H ** -0.5).to(dtype)
    w_up = (torch.randn(E, I, H, device=device) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device=device) * I ** -0.5).to(dtype)
    expert_ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)])
    weights = torch.rand(T, k, device=device)
    return x, w_gate, w_up, w_down, expert_ids, weights


@pytest.mark.parametrize(("T", "H", "I", "E", "k"), [(1, 32, 48, 4, 2), (13, 96, 80, 6, 3), (40, 64, 24, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_ref(T, H, I, E, k, dtype, device) -> None:
    args = _problem(T, H, I, E, k, dtype, device)
    y = fused_moe(*args)
    y_ref = fused_moe_ref(*args)
    assert y.dtype == dtype
    assert y.shape == (T, H)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    else:
        scale = y_ref.float().abs().max().item()
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2.0 ** -7, atol=2.0 ** -7 * scale)


@pytest.mark.parametrize(("T", "H", "I", "E", "k"), [(9, 200, 144, 4, 2), (3, 128, 128, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_matches_ref(T, H, I, E, k, dtype, device) -> None:
    x, w_gate, w_up, w_down, expert_ids, weights = _problem(T, H, I, E, k, torch.float32, device)
    quantized = [[weight_quant_ref(w[e]) for e in range(E)] for w in (w_gate, w_up, w_down)]
    wq = [torch.stack([q for q, _ in per_e]) for per_e in quantized]
    ws = [torch.stack([s for _, s in per_e]) for per_e in quantized]
    kw = {"w_gate_scale": ws[0], "w_up_scale": ws[1], "w_down_scale": ws[2]}
    x = x.to(dtype)
    y = fused_moe(x, *wq, expert_ids, weights, **kw)
    y_ref = fused_moe_ref(x, *wq, expert_ids, weights, **kw)
    scale = y_ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2.0 ** -7, atol=2.0 ** -7 * scale)


def test_moe_align_layout(device) -> None:
    expert_ids = torch.tensor([[2, 0], [2, 1], [0, 2]], device=device)
    sorted_pairs, block_expert = moe_align(expert_ids, n_experts=4, block_m=2)
    P = 6
    blocks = sorted_pairs.view(-1, 2).tolist()
    # expert 0: pairs 1, 4; expert 1: pair 3 + pad; expert 2: pairs 0, 2, 5 + pad; expert 3: none
    assert blocks[:5] == [[1, 4], [3, P], [0, 2], [5, P], [P, P]]
    assert block_expert.tolist()[:4] == [0, 1, 2, 2]
    assert set(block_expert.tolist()[4:]) == {-1}


def test_unrouted_expert_and_single_token(device) -> None:
    x, w_gate, w_up, w_down, _, _ = _problem(1, 32, 32, 5, 1, torch.float32, device)
    ids, w = torch.tensor([[4]], device=device), torch.tensor([[0.7]], device=device)
    torch.testing.assert_close(fused_moe(x, w_gate, w_up, w_down, ids, w),
                               fused_moe_ref(x, w_gate, w_up, w_down, ids, w), rtol=1e-5, atol=1e-5)


def test_fused_moe_errors(device) -> None:
    x, w_gate, w_up, w_down, ids, w = _problem(4, 32, 48, 4, 2, torch.float32, device)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(x, w_gate, w_up, w_down.transpose(1, 2), ids, w)
    with pytest.raises(ValueError, match="w_gate has dtype"):
        fused_moe(x, w_gate.double(), w_up, w_down, ids, w)
    with pytest.raises(ValueError, match="x has dtype"):
        fused_moe(x.int(), w_gate, w_up, w_down, ids, w)
    with pytest.raises(ValueError, match=r"\[T=4, k\]"):
        fused_moe(x, w_gate, w_up, w_down, ids[:3], w[:3])
    q = w_gate.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="w_gate_scale"):
        fused_moe(x, q, q, w_down.to(torch.float8_e4m3fn), ids, w)
