"""The MoE router: its hyper-parameters, the routing interventions, and the gate module.

Shape legend: T tokens, H hidden, E routed experts, k experts per token.

Routing has one definition, `workbench_kernels.reference.route_ref` (DeepSeek-V2's `MoEGate`, V3's `noaux_tc`,
V4's `Gate`; it is also the reference the `moe_gate` kernel is tested against): scores by softmax (V2), sigmoid
(V3) or sqrt(softplus) (V4); `e_score_correction_bias` only for selection; group-limited selection by group max (V2)
or top-2 sum (V3; V4 has no groups); weights are the unbiased scores of the chosen experts, renormalised when
`norm_topk_prob` and k > 1 (V4: for every k, `norm_single`), times `routed_scaling_factor`. Equal scores go to the
lower expert (and group) index, on every device.
V4's first `num_hash_layers` layers do not choose: their experts are `tid2eid[token id]` (a fixed table in the
checkpoint), and only the weights come from the scores (`hash_route_ref`).
Interventions (`RouteOverride`, built and validated by `workbench.controls`) enter as an explicit argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.model import dispatch
from workbench_kernels.reference import KERNEL_SCORING_FUNCS, hash_route_ref, route_ref, router_scores_ref


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
    norm_single: bool = False  # renormalise a single chosen expert too (V4's gate divides for every k)

    @classmethod
    def from_config(cls, c: ModelConfig) -> RoutingParams:
        # V4's gate ignores norm_topk_prob and renormalises for every k (transformers and DeepSeek's code)
        return cls(c.num_experts_per_tok, c.n_group, c.topk_group, c.topk_method, c.scoring_func,
                   c.norm_topk_prob or c.is_v4, c.routed_scaling_factor, norm_single=c.is_v4)


@dataclass(frozen=True, eq=False)
class RouteOverride:
    """One MoE layer's routing intervention in tensor form; `workbench.controls` builds it after validation."""

    params: RoutingParams  # top-k, topk_group, norm_topk_prob, routed_scaling_factor after overrides
    bias_offset: torch.Tensor | None = None  # [E] added to the selection scores (not to the weights)
    mask: torch.Tensor | None = None  # [E] bool, False = ablated (never selected)
    force: torch.Tensor | None = None  # [f] expert ids placed in the first f slots, in this order
    temperature: float = 1.0  # router logits are divided by it before scoring
    shared_experts: bool = True
    replay_ids: torch.Tensor | None = None  # [T, k] experts to use instead of routing (a recorded routing)
    replay_weights: torch.Tensor | None = None  # [T, k] fp32 weights to apply with them, as recorded


def route(logits: torch.Tensor, bias: torch.Tensor | None, p: RoutingParams,
          mask: torch.Tensor | None = None,
          force: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (scores [T, E] fp32, expert ids [T, k] in descending choice order, weights [T, k] fp32).

    `route_ref` with the params of `p`; `mask` [E] bool marks experts that may be chosen (False = ablated),
    `force` [f] expert ids that take the first f slots (see `route_ref`).
    """
    return route_ref(logits, bias, top_k=p.top_k, n_group=p.n_group, topk_group=p.topk_group,
                     scoring_func=p.scoring_func,  # type: ignore[arg-type]  # checked by route_ref
                     topk_method=p.topk_method,  # type: ignore[arg-type]  # checked by route_ref
                     norm_topk_prob=p.norm_topk_prob, routed_scaling_factor=p.routed_scaling_factor,
                     mask=mask, force=force, norm_single=p.norm_single)


def hash_route(logits: torch.Tensor, ids: torch.Tensor, p: RoutingParams,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A hash layer's routing: the given experts `ids` [T, k] weighted by their scores (`hash_route_ref`)."""
    return hash_route_ref(logits, ids, scoring_func=p.scoring_func,  # type: ignore[arg-type]  # config-checked
                          norm_topk_prob=p.norm_topk_prob, routed_scaling_factor=p.routed_scaling_factor, mask=mask)


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """The gate's scores before bias and top-k: [T, E] fp32 (what `hook_router_scores` reports)."""
    return router_scores_ref(logits, scoring_func)  # type: ignore[arg-type]  # config-checked


class Gate(nn.Module):
    """The router's weight [E, H] and V3/V4's balancing bias [E], or for a V4 hash layer the fixed table `tid2eid`
    [vocab, k] (token id -> its experts) instead of the bias; `select` routes on the configured backend."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        E, H = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(E, H))
        self.is_hash = config.is_hash_layer(layer)
        # V3/V4 checkpoints carry the balancing bias; V2 ones and V4 hash layers do not (it is then a zero buffer
        # left out of saves)
        self.has_bias = not self.is_hash and (config.is_v4 or config.topk_method == "noaux_tc")
        self.e_score_correction_bias: torch.Tensor
        self.register_buffer("e_score_correction_bias", torch.zeros(E), persistent=self.has_bias)
        self.tid2eid: torch.Tensor | None
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok, dtype=torch.int64)
                             if self.is_hash else None)
        self.backend: dispatch.Backend = "auto"  # see workbench.model.backend.set_backend

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # (no no-op casts: a decode step counts dispatches)
            return F.linear(x, self.weight)  # [T, E]
        return F.linear(x.float(), self.weight.float())  # [T, E]

    def select(self, logits: torch.Tensor, p: RoutingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The uncontrolled routing of `logits` [T, E]: `route`, or the `moe_gate` kernel (same ids and weights;
        the scores for the probe are then computed in torch)."""
        bias = self.e_score_correction_bias
        # the kernel scores by softmax or sigmoid only and renormalises only for k > 1: V4's sqrtsoftplus (and a
        # renormalised single expert) run in torch, also under an explicit "triton" backend (which then raises)
        supported = p.scoring_func in KERNEL_SCORING_FUNCS and not (p.norm_single and p.norm_topk_prob and p.top_k == 1)
        why = (f"moe_gate scores by {list(KERNEL_SCORING_FUNCS)} and renormalises only k > 1 "
               f"(got {p.scoring_func}, k={p.top_k})")
        if not dispatch.use_triton(self.backend, logits.device, "gate", supported, why):
            return route(logits, bias, p)
        grouped = p.n_group > 1 and p.topk_method in ("group_limited_greedy", "noaux_tc")
        ids, weights, _ = dispatch.launcher("moe_gate").moe_gate(
            logits, bias, top_k=p.top_k, n_group=p.n_group, topk_group=p.topk_group, scoring_func=p.scoring_func,
            topk_method=p.topk_method if grouped else "greedy", norm_topk_prob=p.norm_topk_prob,
            routed_scaling_factor=p.routed_scaling_factor)
        return router_scores(logits, p.scoring_func), ids, weights

    def hash_ids(self, input_ids: torch.Tensor | None, layer: int) -> torch.Tensor:
        """A hash layer's experts [T, k] for the token ids [B, S] (or [T]); ValueError without ids."""
        if self.tid2eid is None:
            raise ValueError(f"layer {layer} is not hash-routed: it has no tid2eid table")
        if input_ids is None:
            raise ValueError(f"layer {layer} is hash-routed (its experts are tid2eid[token id]) and needs the token "
                             "ids: pass input_ids (forward_from on embeddings or residuals alone cannot run it)")
        return self.tid2eid[input_ids.reshape(-1)]  # [T, k]
