"""DeepSeekMoE: a gate over fine-grained routed experts plus always-on shared experts.

Shape legend: T tokens, H hidden, E routed experts, k experts per token.

The gate (`workbench.model.routing`) picks k experts per token; the routed `Experts` and the shared `MLP`
(`workbench.model.experts`) compute; their sum is the layer's output. Interventions (`RouteOverride`) enter as an
explicit forward argument: a temperature on the logits, an offset on the selection bias, a mask of ablated experts,
experts forced into the first slots, replaced hyper-parameters, shared experts off, or a recorded routing (ids and
weights) replayed as is. With no override the path is the gate's own, op for op.
DeepSeek-V4: every layer is MoE, scored by sqrt(softplus), with SwiGLU clamped at `swiglu_limit` in routed and
shared experts; its first `num_hash_layers` layers take their experts from `tid2eid[token id]`, so their forward
needs the token ids. On those layers an override may change the weights (temperature, scaling, renormalisation,
ablation: an ablated expert's weight goes to the others) or replay a routing, but not the selection (bias offsets,
forced experts, another top-k): that raises ValueError.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.experts import MLP, Experts
from workbench.model.routing import Gate, RouteOverride, RoutingParams, hash_route, route, router_scores
from workbench.probes import ProbeRegistry


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, probes: ProbeRegistry) -> None:
        super().__init__()
        self.layer = layer
        self.routing = RoutingParams.from_config(config)
        self.gate = Gate(config, layer)
        limit = config.swiglu_limit
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, limit)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, limit)
                               if config.n_shared_experts > 0 else None)
        self.hook_router_scores = probes.site(f"blocks.{layer}.mlp.hook_router_scores")  # [T, E] before bias/top-k
        self.hook_expert_indices = probes.site(f"blocks.{layer}.mlp.hook_expert_indices")  # [T, k] (hash: tid2eid)
        self.hook_expert_weights = probes.site(f"blocks.{layer}.mlp.hook_expert_weights")  # [T, k] applied weights

    def forward(self, x: torch.Tensor, override: RouteOverride | None = None,
                input_ids: torch.Tensor | None = None, *, hash_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                swiglu_limit: float | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]; `input_ids` (the tokens of x's rows, [B, S]) only hash layers read.

        This run's controls: `hash_rows` (token ids [r], experts [r, k]) replace those rows of a hash layer's tid2eid;
        `swiglu_limit` clamps the routed and shared experts instead of the config's limit."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        logits = self.gate.logits(flat)  # [T, E]
        if override is not None and override.replay_ids is not None and override.replay_weights is not None:
            if override.replay_ids.shape[0] != logits.shape[0]:
                raise ValueError(f"layer {self.layer}: the replayed routing covers {override.replay_ids.shape[0]} "
                                 f"tokens, this call runs {logits.shape[0]}")
            scores = router_scores(logits, self.routing.scoring_func)  # [T, E]
            ids, weights = override.replay_ids, override.replay_weights  # [T, k] each, as recorded
        elif self.gate.is_hash:
            scores, ids, weights = self._hash_route(logits, input_ids, override, hash_rows)
        elif override is None:
            scores, ids, weights = self.gate.select(logits, self.routing)
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
        y = self.experts(flat, ids, weights, swiglu_limit)
        if self.shared_experts is not None and (override is None or override.shared_experts):
            y = y + self.shared_experts(flat, swiglu_limit)
        return y.view(shape)

    def _hash_route(self, logits: torch.Tensor, input_ids: torch.Tensor | None,
                    override: RouteOverride | None, hash_rows: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.gate.hash_ids(input_ids, self.layer)  # [T, k]
        if hash_rows is not None and input_ids is not None:  # this run's tid2eid edits: those tokens' rows replaced
            tokens, experts = hash_rows  # [r], [r, k]
            match = input_ids.reshape(-1)[:, None] == tokens[None]  # [T, r]
            ids = torch.where(match.any(-1, keepdim=True), experts[match.int().argmax(-1)], ids)  # [T, k]
        if ids.shape[0] != logits.shape[0]:
            raise ValueError(f"layer {self.layer}: {ids.shape[0]} token ids for {logits.shape[0]} tokens")
        if override is None:
            return hash_route(logits, ids, self.routing)
        changed = [name for name, moved in (("bias_offset", override.bias_offset is not None),
                                            ("force", override.force is not None and override.force.numel() > 0),
                                            ("top_k", override.params.top_k != self.routing.top_k)) if moved]
        if changed:
            raise ValueError(f"layer {self.layer} is hash-routed (experts = tid2eid[token id]): {changed} would change "
                             "the selection, which this layer does not make; only weights and ablation apply")
        if override.temperature != 1.0:
            logits = logits / override.temperature
        return hash_route(logits, ids, override.params, override.mask)
