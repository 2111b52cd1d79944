"""DeepSeekMoE: a gate over fine-grained routed experts plus always-on shared experts.

Shape legend: T tokens, H hidden, E routed experts, k experts per token, G groups, I expert width.

Routing (`route`), as DeepSeek-V2/V3 define it:
1. scores = softmax (V2) or sigmoid (V3) of the router logits, in fp32.
2. selection scores = scores + e_score_correction_bias (V3's auxiliary-loss-free balancing; selection only).
3. group-limited: keep the `topk_group` best of `n_group` groups, a group scored by its max (V2,
   group_limited_greedy) or the sum of its top-2 (V3, noaux_tc); the rest cannot be chosen.
4. top-k of the selection scores; the weights are the *unbiased* scores of the chosen experts,
   renormalised if `norm_topk_prob`, times `routed_scaling_factor`.
Experts are stacked 3-D weights; `experts_forward` sorts (token, slot) pairs by expert and runs one batched
matmul per projection over the experts that received tokens, with no Python loop over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.probes import ProbeRegistry


@dataclass(frozen=True)
class RoutingParams:
    """The routing hyper-parameters the gate obeys (from the config; interventions replace them)."""

    top_k: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_config(cls, c: ModelConfig) -> RoutingParams:
        return cls(c.num_experts_per_tok, c.n_group, c.topk_group, c.topk_method, c.scoring_func, c.norm_topk_prob,
                   c.routed_scaling_factor)


def route(logits: torch.Tensor, bias: torch.Tensor | None, p: RoutingParams,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (scores [T, E] fp32, expert ids [T, k] in descending choice order, weights [T, k] fp32).

    `mask` [E] bool (optional) marks experts that may be chosen at all (False = ablated).
    """
    T, E = logits.shape
    logits = logits.float()
    scores = logits.softmax(dim=-1) if p.scoring_func == "softmax" else logits.sigmoid()  # [T, E]
    choice = scores if bias is None else scores + bias.float()  # [T, E]
    if mask is not None:
        choice = choice.masked_fill(~mask, float("-inf"))
    if p.n_group > 1 and p.topk_method in ("group_limited_greedy", "noaux_tc"):
        grouped = choice.view(T, p.n_group, E // p.n_group)  # [T, G, E/G]
        if p.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values  # [T, G]
        keep_groups = group_scores.topk(p.topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)  # [T, G]
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // p.n_group, dim=1), float("-inf"))
    ids = choice.topk(p.top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if p.norm_topk_prob and p.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, ids, weights * p.routed_scaling_factor


class Gate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(E, H))
        # V3 checkpoints carry the balancing bias; V2 ones do not (it is then a zero buffer left out of saves)
        self.has_bias = config.topk_method == "noaux_tc"
        self.e_score_correction_bias: torch.Tensor
        self.register_buffer("e_score_correction_bias", torch.zeros(E), persistent=self.has_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T, E]


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, and the shared experts (width n_shared * I)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E routed experts as stacked weights: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, n_experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                    w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [T, H], ids/weights [T, k] -> sum_k weights * expert_k(x)  [T, H]; one batched matmul per projection.

    Few (token, slot) pairs (decoding): gather the chosen experts' weights per slot. Many (prefill): sort the pairs
    by expert and pad each expert's rows to the busiest expert's count, then bmm over the experts that were hit.
    """
    T, H = x.shape
    k = ids.shape[1]
    if T * k <= w_gate.shape[0]:  # decode-sized: gather each slot's expert weights, skip the sort
        xs = x[:, None, :, None]  # [T, 1, H, 1]
        g = (w_gate[ids] @ xs)[..., 0]  # [T, k, I]
        u = (w_up[ids] @ xs)[..., 0]  # [T, k, I]
        out = (w_down[ids] @ (F.silu(g) * u)[..., None])[..., 0]  # [T, k, H]
        return (out * weights[..., None].to(out.dtype)).sum(dim=1)
    flat_ids = ids.reshape(-1)  # [T*k]
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    sorted_ids = flat_ids[order]
    active, counts = sorted_ids.unique_consecutive(return_counts=True)  # experts that received tokens
    starts = counts.cumsum(0) - counts
    slot_of_active = torch.repeat_interleave(torch.arange(len(active), device=x.device), counts)  # [T*k]
    row = torch.arange(T * k, device=x.device) - starts[slot_of_active]  # position within its expert
    capacity = int(counts.max())
    token_of = order // k
    buf = x.new_zeros(len(active), capacity, H)  # [A, cap, H], A = experts hit
    buf[slot_of_active, row] = x[token_of]
    g = torch.bmm(buf, w_gate[active].transpose(1, 2))  # [A, cap, I]
    u = torch.bmm(buf, w_up[active].transpose(1, 2))  # [A, cap, I]
    out = torch.bmm(F.silu(g) * u, w_down[active].transpose(1, 2))  # [A, cap, H]
    contrib = out[slot_of_active, row] * weights.reshape(-1)[order, None].to(out.dtype)  # [T*k, H]
    return x.new_zeros(T, H).index_add_(0, token_of, contrib)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, probes: ProbeRegistry) -> None:
        super().__init__()
        self.layer = layer
        self.routing = RoutingParams.from_config(config)
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.hook_router_scores = probes.site(f"blocks.{layer}.mlp.hook_router_scores")  # [T, E] before bias/top-k
        self.hook_expert_indices = probes.site(f"blocks.{layer}.mlp.hook_expert_indices")  # [T, k]
        self.hook_expert_weights = probes.site(f"blocks.{layer}.mlp.hook_expert_weights")  # [T, k] applied weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        scores, ids, weights = route(self.gate.logits(flat), self.gate.e_score_correction_bias, self.routing)
        self.hook_router_scores(scores)
        ids = self.hook_expert_indices(ids)
        weights = self.hook_expert_weights(weights)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)
