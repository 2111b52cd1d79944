"""DeepSeekMoE: a gate over fine-grained routed experts plus always-on shared experts.

Shape legend: T tokens, H hidden, E routed experts, k experts per token, G groups, I expert width.

Routing (`route`), as DeepSeek-V2/V3 define it:
1. scores = softmax (V2) or sigmoid (V3) of the router logits, in fp32.
2. selection scores = scores + e_score_correction_bias (V3's auxiliary-loss-free balancing; selection only).
3. group-limited: keep the `topk_group` best of `n_group` groups, a group scored by its max (V2,
   group_limited_greedy) or the sum of its top-2 (V3, noaux_tc); the rest cannot be chosen.
4. top-k of the selection scores; the weights are the *unbiased* scores of the chosen experts,
   renormalised if `norm_topk_prob`, times `routed_scaling_factor`.
Interventions (`RouteOverride`, built and validated by `workbench.controls`) enter as an explicit forward argument:
a temperature on the logits, an offset on the selection bias, a mask of ablated experts, experts forced into the
first slots, replaced hyper-parameters, shared experts off, or a recorded routing (ids and weights) replayed as is.
With no override the path is the one above, op for op.
Experts are stacked 3-D weights; `experts_forward` sorts (token, slot) pairs by expert and runs each expert that was
hit on exactly its own rows (as transformers and vLLM do), or, as the reference, one batched matmul over the experts
that were hit with each padded to the busiest one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.probes import ProbeRegistry, ProbeSite

if TYPE_CHECKING:
    from workbench.model.fp8 import Backend, FP8Format


# How `experts_forward` runs the routed experts: "auto" picks gather (decode-sized) or sorted; the others force one
# (tests compare them).
ExpertsPath = Literal["auto", "gather", "sorted", "padded"]

# The FP8 sites (workbench.model.fp8.SITES) of the layer running now under a run's controls, in this thread or task
# only; None: as the modules are. Set by Block.forward; here, not in fp8.py, so the model imports without Triton.
FP8_RUN_SITES: ContextVar[frozenset[str] | None] = ContextVar("workbench_fp8_run_sites", default=None)


@contextmanager
def run_fp8_sites(sites: frozenset[str] | None) -> Iterator[None]:
    """Within the block, exactly `sites` compute in FP8 in this thread; None: as the modules are."""
    token = FP8_RUN_SITES.set(sites)
    try:
        yield
    finally:
        FP8_RUN_SITES.reset(token)


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

    `mask` [E] bool (optional) marks experts that may be chosen at all (False = ablated).
    `force` [f] (optional) expert ids that take the first f slots whatever their score or group; the other k - f
    are chosen as usual (groups are picked before forcing, so a forced expert does not pull its group in).
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
    if force is not None and force.numel() > 0:
        rest = choice.index_fill(1, force, float("-inf")).topk(p.top_k - force.numel(), dim=-1).indices  # [T, k-f]
        ids = torch.cat([force.to(rest.dtype).expand(T, -1), rest], dim=1)  # [T, k]
    else:
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
        self.backend = "auto"  # "auto" | "torch" | "triton": see workbench.model.backend.set_backend

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
    """E routed experts as stacked weights: gate/up [E, I, H], down [E, H, I].

    `fp8` (set by `workbench.model.fp8.enable_fp8`) runs DeepSeek-V3's FP8 recipe; `backend` (set by
    `workbench.model.backend.set_backend`) picks this file's batched torch path or the fused Triton kernel. Weights
    kept from an FP8 checkpoint are e4m3 codes with `*_scale_inv` [E, ceil(out/128), ceil(in/128)] block scales.
    """

    def __init__(self, n_experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))
        self.gate_proj_scale_inv: torch.Tensor | None
        self.up_proj_scale_inv: torch.Tensor | None
        self.down_proj_scale_inv: torch.Tensor | None
        for name in ("gate_proj_scale_inv", "up_proj_scale_inv", "down_proj_scale_inv"):
            self.register_buffer(name, None)  # None (absent from the state dict) unless FP8 weights are kept
        self.fp8: FP8Format | None = None
        self.backend: Backend = "auto"
        self.hook_fp8_rel_error: ProbeSite | None = None  # [T], set with `fp8`
        self._fp8_cache: dict[str, tuple[tuple[object, ...], torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        run = FP8_RUN_SITES.get()  # a run's FP8 controls for this layer, if any
        if run is not None and ("experts" in run) != (self.fp8 is not None):
            from workbench.model import fp8  # builds on this module; needs Triton's kernel package

            if "experts" in run:
                return fp8.experts_forward_fp8(self, x, ids, weights, fp8.RUN_FORMAT)
            return fp8.experts_forward_hp(self, x, ids, weights)
        if self.fp8 is None and (self.backend == "torch" or (self.backend == "auto" and not x.is_cuda)):
            return experts_forward(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)
        from workbench.model.backend import run_experts  # builds on this module

        return run_experts(self, x, ids, weights)


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                    w_up: torch.Tensor, w_down: torch.Tensor,
                    act_qdq: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    path: ExpertsPath = "auto") -> torch.Tensor:
    """x [T, H], ids/weights [T, k] -> sum_k weights * expert_k(x)  [T, H].

    `path` "gather" (what "auto" takes for few (token, slot) pairs, i.e. decoding): gather the chosen experts' weights
    per slot. "sorted" (prefill): sort the pairs by expert and run each expert hit on its own rows, three matmuls per
    expert. "padded" (the reference for "sorted"): sort, pad each expert's rows to the busiest expert's count, one bmm
    per projection; routing is rarely balanced (the bundled model's busiest expert gets 2.6x the mean), so padding
    costs about that factor in matmul work. `F.grouped_mm` would run "sorted" in one call, but its CPU backward
    fails (torch 2.13) and the forward must not depend on whether autograd is on.
    `act_qdq` (FP8 simulation; weights then are dequantized fp32) quantize-dequantizes the input and the SwiGLU
    output, the latter first rounded to x's dtype, as DeepSeek's FP8 MoE does; the result is in x's dtype.
    """
    dtype = x.dtype
    T, H = x.shape
    k = ids.shape[1]
    if act_qdq is not None:
        x = act_qdq(x)  # [T, H] fp32

    def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = F.silu(g) * u
        return h if act_qdq is None else act_qdq(h.to(dtype))

    if path == "auto":
        path = "gather" if T * k <= w_gate.shape[0] else "sorted"
    if path == "gather":
        xs = x[:, None, :, None]  # [T, 1, H, 1]
        g = (w_gate[ids] @ xs)[..., 0]  # [T, k, I]
        u = (w_up[ids] @ xs)[..., 0]  # [T, k, I]
        out = (w_down[ids] @ swiglu(g, u)[..., None])[..., 0]  # [T, k, H]
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(dtype)
    flat_ids = ids.reshape(-1)  # [T*k]
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // k  # [T*k] token of each sorted pair
    pair_weights = weights.reshape(-1)[order, None]  # [T*k, 1]
    if path == "sorted":
        rows_per_expert = torch.bincount(flat_ids, minlength=w_gate.shape[0]).tolist()  # [E], in sorted order
        xs = x.index_select(0, token_of)  # [T*k, H]
        outs = []
        first = 0
        for e, n in enumerate(rows_per_expert):
            if n:
                xe = xs[first : first + n]  # [n, H] this expert's rows
                outs.append(F.linear(swiglu(F.linear(xe, w_gate[e]), F.linear(xe, w_up[e])), w_down[e]))  # [n, H]
                first += n
        out = torch.cat(outs)  # [T*k, H]
        return x.new_zeros(T, H).index_add_(0, token_of, out * pair_weights.to(out.dtype)).to(dtype)
    if path != "padded":
        raise ValueError(f"experts path must be one of 'auto', 'gather', 'sorted', 'padded', got {path!r}")
    sorted_ids = flat_ids[order]
    active, counts = sorted_ids.unique_consecutive(return_counts=True)  # experts that received tokens
    starts = counts.cumsum(0) - counts
    slot_of_active = torch.repeat_interleave(torch.arange(len(active), device=x.device), counts)  # [T*k]
    row = torch.arange(T * k, device=x.device) - starts[slot_of_active]  # position within its expert
    capacity = int(counts.max())
    buf = x.new_zeros(len(active), capacity, H)  # [A, cap, H], A = experts hit
    buf[slot_of_active, row] = x[token_of]
    g = torch.bmm(buf, w_gate[active].transpose(1, 2))  # [A, cap, I]
    u = torch.bmm(buf, w_up[active].transpose(1, 2))  # [A, cap, I]
    out = torch.bmm(swiglu(g, u), w_down[active].transpose(1, 2))  # [A, cap, H]
    contrib = out[slot_of_active, row] * pair_weights.to(out.dtype)  # [T*k, H]
    return x.new_zeros(T, H).index_add_(0, token_of, contrib).to(dtype)


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
        bias: torch.Tensor | None = self.gate.e_score_correction_bias
        if override is None and self.gate.backend != "torch" and (self.gate.backend == "triton" or logits.is_cuda):
            from workbench.model.backend import route_triton  # lazy: the kernels need triton

            scores, ids, weights = route_triton(logits, bias, self.routing)
        elif override is None:
            scores, ids, weights = route(logits, bias, self.routing)
        elif override.replay_ids is not None and override.replay_weights is not None:
            if override.replay_ids.shape[0] != logits.shape[0]:
                raise ValueError(f"layer {self.layer}: the replayed routing covers {override.replay_ids.shape[0]} "
                                 f"tokens, this call runs {logits.shape[0]}")
            lf = logits.float()
            scores = lf.softmax(dim=-1) if self.routing.scoring_func == "softmax" else lf.sigmoid()  # [T, E]
            ids, weights = override.replay_ids, override.replay_weights  # [T, k] each, as recorded
        else:
            if override.temperature != 1.0:
                logits = logits / override.temperature
            if override.bias_offset is not None:
                bias = self.gate.e_score_correction_bias + override.bias_offset
            scores, ids, weights = route(logits, bias, override.params, override.mask, override.force)
        self.hook_router_scores(scores)
        ids = self.hook_expert_indices(ids)
        weights = self.hook_expert_weights(weights)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None and (override is None or override.shared_experts):
            y = y + self.shared_experts(flat)
        return y.view(shape)
