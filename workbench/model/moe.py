"""DeepSeekMoE: a gate over fine-grained routed experts plus always-on shared experts.

Shape legend: T tokens, H hidden, E routed experts, k experts per token.

The gate (`workbench.model.routing`) picks k experts per token; the routed `Experts` and the shared `MLP`
(`workbench.model.experts`) compute; their sum is the layer's output. Interventions (`RouteOverride`) enter as an
explicit forward argument: a temperature on the logits, an offset on the selection bias, a mask of ablated experts,
experts forced into the first slots, replaced hyper-parameters, shared experts off, or a recorded routing (ids and
weights) replayed as is. With no override the path is the gate's own, op for op.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.experts import MLP, Experts
from workbench.model.routing import Gate, RouteOverride, RoutingParams, route, router_scores
from workbench.probes import ProbeRegistry


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

    def forward(self, x: torch.Tensor, override: RouteOverride | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        logits = self.gate.logits(flat)  # [T, E]
        if override is None:
            scores, ids, weights = self.gate.select(logits, self.routing)
        elif override.replay_ids is not None and override.replay_weights is not None:
            if override.replay_ids.shape[0] != logits.shape[0]:
                raise ValueError(f"layer {self.layer}: the replayed routing covers {override.replay_ids.shape[0]} "
                                 f"tokens, this call runs {logits.shape[0]}")
            scores = router_scores(logits, self.routing.scoring_func)  # [T, E]
            ids, weights = override.replay_ids, override.replay_weights  # [T, k] each, as recorded
        else:
            bias = self.gate.e_score_correction_bias
            if override.temperature != 1.0:
                logits = logits / override.temperature
            if override.bias_offset is not None:
                bias = bias + override.bias_offset
            scores, ids, weights = route(logits, bias, override.params, override.mask, override.force)
        self.hook_router_scores(scores)
        ids = self.hook_expert_indices(ids)
        weights = self.hook_expert_weights(weights)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None and (override is None or override.shared_experts):
            y = y + self.shared_experts(flat)
        return y.view(shape)
