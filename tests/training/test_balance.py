"""V3 load balancing: the bias update evens out expert load; the sequence-wise loss follows eq. 17-20."""

from __future__ import annotations

import torch

from workbench.config import PRESETS
from workbench.model.routing import RoutingParams, route
from workbench.model.transformer import DeepSeekModel
from workbench.training.balance import expert_load, max_over_mean, sequence_balance_loss, update_bias


def _balance_loss_loop(scores: torch.Tensor, ids: torch.Tensor, batch: int, top_k: int) -> float:
    """Eq. 17-20 written out per sequence and per expert, the plain reference."""
    T, E = scores.shape
    S = T // batch
    total = 0.0
    for b in range(batch):
        s = scores[b * S:(b + 1) * S]
        chosen = ids[b * S:(b + 1) * S].tolist()
        for i in range(E):
            f_i = E / (top_k * S) * sum(i in row for row in chosen)
            P_i = sum(float(s[t, i] / s[t].sum()) for t in range(S)) / S
            total += f_i * P_i
    return total / batch


def test_sequence_balance_loss_matches_the_paper_formula():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3 * 10, 8, generator=gen)  # [T, E], 3 sequences of 10 tokens
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(30)])  # [T, 2]
    got = sequence_balance_loss(scores, ids, batch=3, top_k=2)
    assert abs(float(got) - _balance_loss_loop(scores, ids, 3, 2)) < 1e-5
    # even load and equal scores give exactly 1; the loss grows when load and score mass pile on one expert
    even_ids = torch.arange(8).repeat(5).view(20, 2)
    assert abs(float(sequence_balance_loss(torch.ones(20, 8), even_ids, 1, 2)) - 1.0) < 1e-6
    skewed = torch.ones(20, 8)
    skewed[:, 0] = 10.0
    skew_ids = torch.stack([torch.tensor([0, 1 + t % 7]) for t in range(20)])
    assert float(sequence_balance_loss(skewed, skew_ids, 1, 2)) > 2.0
    # it is differentiable in the scores (the router learns from it), not in the discrete choices
    s = scores.clone().requires_grad_(True)
    sequence_balance_loss(s, ids, 3, 2).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bias_update_moves_load_toward_balance():
    params = RoutingParams.from_config(PRESETS["tiny"])  # 16 experts, 4 groups, top-4, noaux_tc
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 16, generator=gen) + torch.linspace(-3, 3, 16)  # [T, E]: a strong skew
    bias = torch.zeros(16)
    before = max_over_mean(expert_load(route(logits, bias, params)[1], 16))
    history = []
    for _ in range(300):
        ids = route(logits, bias, params)[1]
        load = expert_load(ids, 16)  # [E]
        history.append(max_over_mean(load))
        update_bias(bias, load, gamma=1e-2)
    after = max_over_mean(expert_load(route(logits, bias, params)[1], 16))
    assert before > 2.5  # the skew really overloads a few experts
    assert after < 1.3  # V3's update brings them near even (sign steps of 0.01 keep it from settling exactly)
    # the overloaded expert's bias went down, the starved one's up
    assert bias[15] < 0 < bias[0]


def test_bias_is_a_buffer_and_the_router_learns_through_the_chosen_experts():
    model = DeepSeekModel.random(PRESETS["tiny"], seed=0).train()
    gate = model.layers[1].mlp.gate
    assert "e_score_correction_bias" in dict(gate.named_buffers())
    assert all(p is not gate.e_score_correction_bias for p in model.parameters())
    chosen: dict[int, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        chosen[int(name.split(".")[1])] = value

    ids = torch.tensor([[5]])  # one token: 4 of 16 experts chosen per layer
    with model.probes.listen(["blocks.*.mlp.hook_expert_indices"], keep):
        logits = model(ids)
    torch.nn.functional.cross_entropy(logits[0], torch.tensor([7])).backward()
    assert gate.weight.grad is not None
    rows_with_grad = set((gate.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist())
    # sigmoid scores of unchosen experts take no part in the output, so only the chosen rows learn (no aux loss here)
    assert rows_with_grad == set(chosen[1].flatten().tolist())
