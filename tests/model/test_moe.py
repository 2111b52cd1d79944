"""Routing semantics and the batched expert computation against a per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.model.moe import RoutingParams, experts_forward, route

P = RoutingParams(top_k=2, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
                  norm_topk_prob=True, routed_scaling_factor=2.5)


def test_bias_changes_selection_but_not_weights():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 is always selected ...
    p = RoutingParams(2, 1, 1, "noaux_tc", "sigmoid", False, 1.0)
    scores, ids, weights = route(logits, bias, p)
    assert (ids == 5).any(dim=1).all()
    # ... but its weight is its unbiased score
    torch.testing.assert_close(weights, scores.gather(1, ids))


def test_group_limit_keeps_choices_inside_the_best_groups():
    logits = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    p = RoutingParams(4, 4, 2, "noaux_tc", "sigmoid", True, 1.0)
    scores, ids, _ = route(logits, None, p)
    groups = ids // 4  # [T, k]
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # V3 scores a group by the sum of its top-2 experts: the two kept groups are the two best by that measure
    top2 = scores.view(200, 4, 4).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices.sort(-1).values
    for t in range(200):
        assert set(groups[t].tolist()) <= set(top2[t].tolist())


def test_norm_and_scaling():
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    _, _, w = route(logits, None, RoutingParams(3, 1, 1, "greedy", "softmax", True, 2.0))
    torch.testing.assert_close(w.sum(-1), torch.full((10,), 2.0))
    s, ids, w = route(logits, None, RoutingParams(3, 1, 1, "greedy", "softmax", False, 2.0))
    torch.testing.assert_close(w, 2.0 * s.gather(1, ids))
    assert torch.equal(ids, s.topk(3, dim=-1).indices)  # greedy = plain top-k, in descending order


def test_mask_ablates_an_expert():
    logits = torch.randn(100, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(8, dtype=torch.bool)
    mask[[0, 3]] = False
    _, ids, _ = route(logits, None, RoutingParams(2, 1, 1, "greedy", "softmax", False, 1.0), mask=mask)
    assert not torch.isin(ids, torch.tensor([0, 3])).any()


@pytest.mark.parametrize(("T", "E", "k"), [(1, 8, 2), (37, 8, 3), (64, 16, 4), (5, 64, 6)])
def test_batched_experts_equal_a_per_expert_loop(T, E, k):
    g = torch.Generator().manual_seed(T)
    H, I = 24, 16
    x = torch.randn(T, H, generator=g)
    w_gate, w_up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    w_down = torch.randn(E, H, I, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    expected = torch.zeros(T, H)
    for t in range(T):
        for slot in range(k):
            e = int(ids[t, slot])
            h = F.silu(x[t] @ w_gate[e].T) * (x[t] @ w_up[e].T)
            expected[t] += weights[t, slot] * (h @ w_down[e].T)
    torch.testing.assert_close(experts_forward(x, ids, weights, w_gate, w_up, w_down), expected,
                               atol=1e-4, rtol=1e-5)
