"""MoE gate kernel vs the DeepSeek-style reference.

Expert choice must agree exactly: ties break to the lower index on both sides. Weights are compared per
expert id; they differ only by the ulps of exp/sigmoid and of the sums (fp32), hence rtol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.moe_gate import moe_gate
from workbench_kernels.reference import moe_gate_ref

CONFIGS = {
    # name: (E, top_k, n_group, topk_group, scoring_func, topk_method, norm, scale, bias)
    "v2_lite": (64, 6, 1, 1, "softmax", "greedy", False, 1.0, False),
    "v2": (160, 6, 8, 3, "softmax", "group_limited_greedy", False, 16.0, False),
    "v3": (256, 8, 8, 4, "sigmoid", "noaux_tc", True, 2.5, True),
    "odd_groups": (30, 3, 5, 2, "softmax", "noaux_tc", True, 1.0, True),
    "k1": (7, 1, 1, 1, "sigmoid", "greedy", True, 1.0, False),
}


def _sorted_by_id(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=1)
    return ids.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("T", "dtype"), [(1, torch.float32), (37, torch.float32), (19, torch.bfloat16)])
def test_moe_gate_matches_ref(name, T, dtype, device) -> None:
    E, k, n_group, topk_group, func, method, norm, scale, has_bias = CONFIGS[name]
    logits = torch.randn(T, E, device=device).to(dtype)
    bias = torch.randn(E, device=device) * 0.1 if has_bias else None
    kw = {"top_k": k, "n_group": n_group, "topk_group": topk_group, "scoring_func": func, "topk_method": method,
              "norm_topk_prob": norm, "routed_scaling_factor": scale}
    ids, w, counts = moe_gate(logits, bias, **kw)
    ids_ref, w_ref, counts_ref = moe_gate_ref(logits, bias, **kw)
    ids, w = _sorted_by_id(ids, w)
    ids_ref, w_ref = _sorted_by_id(ids_ref, w_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(counts, counts_ref)
    assert counts.sum() == T * k


def test_group_limit_is_applied(device) -> None:
    # group 1 holds the best single expert but group 0 has the better top-2 sum: noaux_tc keeps group 0 only
    logits = torch.tensor([[3.0, 2.9, -9, -9, 4.0, -9, -9, -9]], device=device)
    kw = {"top_k": 2, "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "norm_topk_prob": True}
    ids, _, _ = moe_gate(logits, top_k=2, n_group=2, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc",
                         norm_topk_prob=True)
    assert sorted(ids[0].tolist()) == [0, 1]
    ids, _, _ = moe_gate(logits, topk_method="group_limited_greedy", **kw)
    assert 4 in ids[0].tolist()


def test_bias_steers_choice_not_weights(device) -> None:
    logits = torch.zeros(2, 8, device=device)
    bias = torch.zeros(8, device=device)
    bias[5] = 1.0
    ids, w, _ = moe_gate(logits, bias, top_k=1, scoring_func="sigmoid", topk_method="greedy")
    assert ids[:, 0].tolist() == [5, 5]
    torch.testing.assert_close(w, torch.full((2, 1), 0.5, device=device))


def test_ties_go_to_lower_index(device) -> None:
    logits = torch.zeros(3, 16, device=device)
    ids, _, counts = moe_gate(logits, top_k=4, n_group=4, topk_group=2, topk_method="noaux_tc")
    ids_ref, _, counts_ref = moe_gate_ref(logits, top_k=4, n_group=4, topk_group=2, topk_method="noaux_tc")
    assert torch.equal(ids, ids_ref)
    assert torch.equal(counts, counts_ref)


def test_moe_gate_errors(device) -> None:
    logits = torch.randn(4, 12, device=device)
    with pytest.raises(ValueError, match="n_group=5 must divide"):
        moe_gate(logits, top_k=2, n_group=5, topk_group=1, topk_method="noaux_tc")
    with pytest.raises(ValueError, match="top_k=7"):
        moe_gate(logits, top_k=7, n_group=4, topk_group=2, topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="logits has dtype"):
        moe_gate(logits.to(torch.int32), top_k=2)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        moe_gate(logits[0], top_k=2)
    with pytest.raises(ValueError, match="bias must be"):
        moe_gate(logits, torch.zeros(11, device=device), top_k=2)
    with pytest.raises(ValueError, match="scoring_func"):
        moe_gate(logits, top_k=2, scoring_func="relu")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equal_scores_pick_the_same_experts_in_the_same_order(name, device) -> None:
    """All-equal logits (every expert and every group tied): kernel and reference both take the lowest indices,
    slot for slot, so the model's routing is the same on the torch and the Triton path."""
    E, k, n_group, topk_group, func, method, norm, scale, _ = CONFIGS[name]
    kw = {"top_k": k, "n_group": n_group, "topk_group": topk_group, "scoring_func": func, "topk_method": method,
          "norm_topk_prob": norm, "routed_scaling_factor": scale}
    logits = torch.zeros(3, E, device=device)
    ids, w, _ = moe_gate(logits, None, **kw)
    ids_ref, w_ref, _ = moe_gate_ref(logits, None, **kw)
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    assert ids_ref[0].tolist() == list(range(k))
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-6, atol=0)
