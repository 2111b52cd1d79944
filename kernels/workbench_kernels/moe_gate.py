"""The DeepSeek MoE router in one kernel: scores, group-limited top-k, normalisation, per-expert counts.

Steps, per token (DeepSeek-V2 and V3 semantics):
1. scores = softmax (V2) or sigmoid (V3) of the fp32 router logits.
2. choice = scores + e_score_correction_bias: the bias (V3's auxiliary-loss-free balancing) steers *which*
   experts are picked, never their weights.
3. Group limit: experts form `n_group` equal groups; a group's score is its max ("group_limited_greedy", V2) or
   the sum of its top two ("noaux_tc", V3); only the best `topk_group` groups stay, the others are set to -inf.
4. top_k experts by choice; weights are the unbiased scores of those experts, divided by their sum (+1e-20)
   when `norm_topk_prob` and top_k > 1 (DeepSeek's MoEGate), then multiplied by `routed_scaling_factor`.
Ties go to the lower expert / group index in both the kernel and its reference `reference.route_ref` (the
model's own torch routing), so the two agree exactly on which experts win.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, check_launchable
from .reference import TOPK_METHODS, ScoringFunc, TopkMethod, check_gate_args

# T = tokens, E = experts, G = groups, k = top_k

_METHODS = {name: i for i, name in enumerate(TOPK_METHODS)}  # greedy 0, group_limited_greedy 1, noaux_tc 2


@triton.jit
def moe_gate_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, counts_ptr, T, E, scaling,
                    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, METHOD: tl.constexpr, N_GROUP: tl.constexpr,
                    TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    mask_e = offs_e < E
    neg_inf = float("-inf")
    x = tl.load(logits_ptr + offs_t[:, None] * E + offs_e[None, :], mask=mask_t[:, None] & mask_e[None, :],
                other=neg_inf).to(tl.float32)  # [BT, BE]
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        x_max = tl.max(x, axis=1)
        x_max = tl.where(x_max == neg_inf, 0.0, x_max)  # rows past T are all -inf
        p = tl.exp(x - x_max[:, None])
        scores = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(mask_e[None, :], choice, neg_inf)

    if METHOD != 0:
        group_size = E // N_GROUP
        group_of = offs_e // group_size  # [BE]
        offs_g = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)  # [BT, BG]
        for g in tl.static_range(N_GROUP):
            in_g = (group_of == g)[None, :]
            member = tl.where(in_g, choice, neg_inf)
            best = tl.max(member, axis=1)
            if METHOD == 2:  # noaux_tc: sum of the two best, removing one copy of the best
                first = tl.argmax(member, axis=1)
                second = tl.max(tl.where(offs_e[None, :] == first[:, None], neg_inf, member), axis=1)
                best = best + second
            gscore = tl.where(offs_g[None, :] == g, best[:, None], gscore)
        keep_group = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(gscore, axis=1)  # [BT]
            hit = offs_g[None, :] == pick[:, None]
            keep_group = keep_group | hit
            gscore = tl.where(hit, neg_inf, gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for g in tl.static_range(N_GROUP):
            kept = tl.max(tl.where(offs_g[None, :] == g, keep_group.to(tl.int32), 0), axis=1) > 0  # [BT]
            keep = keep | (kept[:, None] & (group_of == g)[None, :])
        choice = tl.where(keep, choice, neg_inf)

    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)  # [BT, BK]
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        pick = tl.argmax(choice, axis=1)  # [BT]
        hit = offs_e[None, :] == pick[:, None]  # [BT, BE]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        ids = tl.where(offs_k[None, :] == i, pick[:, None], ids)
        w = tl.where(offs_k[None, :] == i, weight[:, None], w)
        counts += tl.sum((hit & mask_t[:, None]).to(tl.int32), axis=0)
        choice = tl.where(hit, neg_inf, choice)
    if NORM:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scaling
    out_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
    tl.store(ids_ptr + out_offs, ids.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out_offs, w, mask=out_mask)
    tl.atomic_add(counts_ptr + offs_e, counts, mask=mask_e)


def moe_gate(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
             topk_group: int = 1, scoring_func: ScoringFunc = "softmax", topk_method: TopkMethod = "greedy",
             norm_topk_prob: bool = False,
             routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        logits: [T, E] router logits (x @ gate.weight^T), any float dtype; scored in fp32.
        bias: [E] `e_score_correction_bias` (V3) or None.

    Returns:
        expert_ids: [T, top_k] int64, in choice order.
        weights: [T, top_k] fp32.
        counts: [E] int32 tokens routed to each expert.
    """
    check_gate_args(logits, bias, top_k, n_group, topk_group, scoring_func, topk_method)
    tensors = (logits,) if bias is None else (logits, bias)
    check_launchable(moe_gate_kernel, *tensors)
    logits = logits.contiguous()
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    if T == 0:
        return ids, weights, counts
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, triton.next_power_of_2(T), 8192 // block_e))
    grouped = topk_method != "greedy"
    moe_gate_kernel[(cdiv(T, block_t),)](
        logits, bias.contiguous() if bias is not None else logits, ids, weights, counts, T, E,
        float(routed_scaling_factor),
        HAS_BIAS=bias is not None, SIGMOID=scoring_func == "sigmoid", METHOD=_METHODS[topk_method],
        N_GROUP=n_group if grouped else 1, TOPK_GROUP=topk_group if grouped else 1, TOP_K=top_k,
        NORM=norm_topk_prob and top_k > 1, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(n_group if grouped else 1),
    )
    return ids, weights, counts
