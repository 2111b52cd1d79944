"""One routing definition: the model's `route` is the kernels' reference `route_ref`, and equal scores go to the
lower expert (and group) index on every path."""

from __future__ import annotations

import pytest
import torch

import workbench_kernels.reference as reference
from workbench.config import PRESETS
from workbench.model import routing
from workbench.model.routing import RoutingParams, route
from workbench.model.transformer import DeepSeekModel
from workbench_kernels.reference import top_indices


def test_model_routing_is_the_kernel_reference() -> None:
    assert routing.route_ref is reference.route_ref
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(64, 16, generator=g), torch.randn(16, generator=g) * 0.1
    p = RoutingParams(4, 4, 2, "noaux_tc", "sigmoid", True, 2.5)
    _, ids, weights = route(logits, bias, p)
    ref_ids, ref_weights, counts = reference.moe_gate_ref(logits, bias, top_k=4, n_group=4, topk_group=2,
                                                          scoring_func="sigmoid", topk_method="noaux_tc",
                                                          norm_topk_prob=True, routed_scaling_factor=2.5)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=16).to(torch.int32))


@pytest.mark.parametrize(("method", "scoring", "n_group", "topk_group", "want"), [
    ("greedy", "softmax", 1, 1, [0, 1, 2, 3]),
    ("group_limited_greedy", "softmax", 4, 2, [0, 1, 2, 3]),  # groups 0 and 1 tie with all others: the lowest win
    ("noaux_tc", "sigmoid", 4, 1, [0, 1, 2, 3]),
    ("noaux_tc", "sigmoid", 8, 2, [0, 1, 2, 3]),  # groups of two: groups 0 and 1 hold experts 0-3
])
def test_all_equal_scores_choose_the_lowest_experts_in_order(method, scoring, n_group, topk_group, want) -> None:
    logits = torch.zeros(5, 16)
    _, ids, weights = route(logits, None, RoutingParams(4, n_group, topk_group, method, scoring, True, 1.0))
    assert ids.tolist() == [want] * 5
    torch.testing.assert_close(weights, torch.full((5, 4), 0.25))  # equal scores, normalised


def test_a_tie_for_the_last_slot_goes_to_the_lower_expert() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])  # experts 3 and 5 tie for slot 2
    _, ids, _ = route(logits, None, RoutingParams(2, 1, 1, "greedy", "softmax", False, 1.0))
    assert ids.tolist() == [[0, 3]]
    # a bias that lifts expert 5 breaks the tie the other way, and its weight stays the unbiased score
    bias = torch.zeros(8)
    bias[5] = 1e-3
    scores, ids, weights = route(logits, bias, RoutingParams(2, 1, 1, "greedy", "softmax", False, 1.0))
    assert ids.tolist() == [[0, 5]] and torch.equal(weights, scores[:, [0, 5]])


def test_tied_groups_keep_the_lower_group() -> None:
    logits = torch.full((1, 8), -10.0)
    logits[0, [1, 5]] = 3.0  # groups 0 and 2 (of 4, two experts each) tie on their best expert
    _, ids, _ = route(logits, None, RoutingParams(2, 4, 1, "group_limited_greedy", "softmax", False, 1.0))
    assert ids.tolist() == [[1, 0]]  # only group 0 (experts 0, 1) kept; inside it 1 beats 0


def test_a_model_with_a_zero_router_routes_every_token_to_the_lowest_experts() -> None:
    model = DeepSeekModel.random(PRESETS["tiny"], seed=0)
    cfg = model.config
    seen = {}
    with torch.no_grad():
        for layer in cfg.moe_layers:
            model.layers[layer].mlp.gate.weight.zero_()
        with model.probes.listen(["blocks.*.mlp.hook_expert_indices"], lambda n, v: seen.__setitem__(n, v.clone())):
            model(torch.tensor([[1, 2, 3, 4]]))
    per_group = cfg.n_routed_experts // cfg.n_group
    lowest = list(range(min(cfg.num_experts_per_tok, per_group * cfg.topk_group)))
    assert seen and all(v.tolist() == [lowest] * 4 for v in seen.values())


@pytest.mark.parametrize("few_values", [True, False])
def test_top_indices_on_wide_rows_is_the_stable_sort(few_values):
    # rows wider than _SORT_WIDTH take topk + a tie repair; the result must be the stable sort's, ties included
    # (indexer scores: ReLU zeros, -inf future keys, early rows with fewer finite keys than k)
    g = torch.Generator().manual_seed(int(few_values))
    for trial in range(60):
        T = int(torch.randint(257, 700, (1,), generator=g))
        k = int(torch.randint(1, T, (1,), generator=g))
        x = torch.randint(0, 6 if few_values else 10**6, (3, 5, T), generator=g).float()
        if trial % 3 == 0:
            x[..., : T // 2] = float("-inf")
        want = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
        assert torch.equal(top_indices(x, k), want), (trial, T, k)
