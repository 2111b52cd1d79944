"""Routing semantics, and every path of the routed-expert computation against a per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.model.experts import experts_forward
from workbench.model.routing import RoutingParams, route

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


def per_expert_loop(x, ids, weights, w_gate, w_up, w_down):
    """The definition, one (token, slot) at a time: sum_k weights * down(silu(gate x) * up x)."""
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            h = F.silu(x[t] @ w_gate[e].T) * (x[t] @ w_up[e].T)
            expected[t] += weights[t, slot] * (h @ w_down[e].T)
    return expected


def expert_problem(T, E, k, H=24, I=16, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w_gate, w_up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    w_down = torch.randn(E, H, I, generator=g)
    if skew:  # a few experts take most pairs, some none: what trained routers do
        prefs = torch.tensor([4.0, 2.0, 1.0] + [0.5] * (E - 5) + [0.0, 0.0])  # [E], the last two never chosen
        ids = torch.stack([torch.multinomial(prefs, k, generator=g) for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, ids, torch.rand(T, k, generator=g), w_gate, w_up, w_down


@pytest.mark.parametrize("path", ["auto", "loop", "gather", "sorted", "padded"])
@pytest.mark.parametrize(("T", "E", "k", "skew"), [(1, 8, 2, False), (37, 8, 3, False), (64, 16, 4, False),
                                                    (5, 64, 6, False), (90, 12, 4, True)])
def test_every_experts_path_equals_a_per_expert_loop(T, E, k, skew, path):
    x, ids, weights, w_gate, w_up, w_down = expert_problem(T, E, k, seed=T, skew=skew)
    torch.testing.assert_close(experts_forward(x, ids, weights, w_gate, w_up, w_down, path=path),
                               per_expert_loop(x, ids, weights, w_gate, w_up, w_down), atol=1e-4, rtol=1e-5)


def test_sorted_and_padded_paths_agree_on_the_bundled_model_shape():
    # the default model's experts (H 128, I 64, 16 experts, top-4) on 1024 tokens with skewed routing
    x, ids, weights, w_gate, w_up, w_down = expert_problem(1024, 16, 4, H=128, I=64, skew=True)
    per_expert = experts_forward(x, ids, weights, w_gate, w_up, w_down, path="sorted")
    torch.testing.assert_close(per_expert, experts_forward(x, ids, weights, w_gate, w_up, w_down, path="padded"),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(experts_forward(x, ids, weights, w_gate, w_up, w_down), per_expert)  # auto = sorted here
    with pytest.raises(ValueError, match="experts path must be one of .* got 'grouped'"):
        experts_forward(x, ids, weights, w_gate, w_up, w_down, path="grouped")  # type: ignore[arg-type]


def test_autograd_does_not_change_the_forward_and_gradients_match_the_loop():
    # a forward with autograd on must equal the same forward under no_grad bit for bit (routing replay relies on it)
    x, ids, weights, w_gate, w_up, w_down = expert_problem(48, 12, 4, seed=5, skew=True)
    # weights at trained-model scale (outputs O(1)), so fp32 reassociation between the paths stays ~1e-6 relative
    leaves = [(t if i == 0 else 0.2 * t).requires_grad_() for i, t in enumerate((x, w_gate, w_up, w_down))]
    y = experts_forward(leaves[0], ids, weights, *leaves[1:])
    with torch.no_grad():
        assert torch.equal(y, experts_forward(leaves[0], ids, weights, *leaves[1:]))
    y.square().sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    per_expert_loop(ref_leaves[0], ids, weights, *ref_leaves[1:]).square().sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
