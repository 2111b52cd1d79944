"""Plain-torch references of every kernel in `workbench_kernels`, and the argument checks they share with it.

This module imports torch only, never Triton: the model's torch path (and so every machine without Triton, such
as macOS and Windows laptops) runs on these functions, and each kernel's test compares the kernel with its
reference here. The launchers (`fp8_quant`, `fp8_gemm`, `moe_gate`, `fused_moe`, `mla_decode`) import Triton and
are imported only when the Triton backend is asked for.

Sections: FP8 block quantization (DeepSeek-V3: 1x128 activation tiles, 128x128 weight blocks), block-FP8 GEMM,
MoE routing (the one routing definition; `workbench.model.routing.route` calls `route_ref`, V4's hash layers
`hash_route_ref`), the fused routed experts, absorbed-MLA decode attention.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._runtime import ACT_DTYPES, FP8_MAX, cdiv, check_dtype, check_ndim, fp8_dtype

QUANT_BLOCK = 128  # the scale block of DeepSeek-V3's FP8 recipe, and the K step of the FP8 kernels

ScoringFunc = Literal["softmax", "sigmoid", "sqrtsoftplus"]
SCORING_FUNCS: tuple[ScoringFunc, ...] = ("softmax", "sigmoid", "sqrtsoftplus")  # what `route_ref` takes
KERNEL_SCORING_FUNCS: tuple[ScoringFunc, ...] = ("softmax", "sigmoid")  # what the `moe_gate` kernel computes
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


# ---------------------------------------------------------------------------------------------- FP8 quantization
# M = rows (tokens), K = columns (hidden), N = weight rows; b = block (128)
def check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")

def act_quant_ref(x: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                  ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `act_quant`."""
    qdtype = fp8_dtype(fmt)
    fmax = FP8_MAX[qdtype]
    K = x.shape[-1]
    n_blocks = cdiv(K, block)
    xf = _pad_last(x.float(), n_blocks * block - K).unflatten(-1, (n_blocks, block))  # [..., nb, b]
    s = xf.abs().amax(dim=-1).clamp_min(1e-4) / fmax  # [..., nb]
    if ue8m0:
        s = pow2_ceil_ref(s)
    q = (xf / s.unsqueeze(-1)).clamp(-fmax, fmax).to(qdtype)
    return q.flatten(-2)[..., :K], s

def weight_quant_ref(w: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                     ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `weight_quant`."""
    qdtype = fp8_dtype(fmt)
    fmax = FP8_MAX[qdtype]
    N, K = w.shape
    nb_n, nb_k = cdiv(N, block), cdiv(K, block)
    wf = torch.zeros(nb_n * block, nb_k * block, dtype=torch.float32, device=w.device)
    wf[:N, :K] = w.float()
    blocks = wf.view(nb_n, block, nb_k, block)  # [nb_n, b, nb_k, b]
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4) / fmax  # [nb_n, nb_k]
    if ue8m0:
        s = pow2_ceil_ref(s)
    q = (blocks / s[:, None, :, None]).clamp(-fmax, fmax).to(qdtype)
    return q.view(nb_n * block, nb_k * block)[:N, :K].contiguous(), s

def check_scale_grid(w: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int]) -> None:
    bn, bk = (block, block) if isinstance(block, int) else block
    want = (cdiv(w.shape[0], bn), cdiv(w.shape[1], bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(w.shape)} weight in {bn}x{bk} "
            f"blocks needs {want} (ceil of each dim / block)"
        )

def weight_dequant_ref(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = 128,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch `weight_dequant`; handles partial last blocks, and (bn, bk) blocks as checkpoints declare them."""
    check_scale_grid(w_fp8, scale_inv, block)
    N, K = w_fp8.shape
    bn, bk = (block, block) if isinstance(block, int) else block
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]  # [N, K]
    return (w_fp8.float() * s).to(out_dtype)

def act_dequant_ref(q: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x = q * scales per 1 x `block` tile: [..., K] FP8, [..., ceil(K/b)] -> [..., K] fp32."""
    K = q.shape[-1]
    return q.float() * scales.repeat_interleave(block, -1)[..., :K]

def pow2_ceil_ref(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (positive normal fp32): the UE8M0 scale of DeepSeek-V3.1."""
    bits = s.float().contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)

def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad the last dim of `x` with `n` zeros."""
    return torch.nn.functional.pad(x, (0, n)) if n else x


# ---------------------------------------------------------------------------------------------- block-FP8 GEMM
# M = tokens, N = output features, K = input features
def check_gemm_operands(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> None:
    fp8 = tuple(FP8_MAX)
    check_dtype("xq", xq, fp8)
    check_dtype("wq", wq, fp8)
    check_dtype("xs", xs, (torch.float32,))
    check_dtype("ws", ws, (torch.float32,))
    if wq.dim() != 2 or xq.dim() < 1 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(f"need xq [..., K] and wq [N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    N, K = wq.shape
    nk = cdiv(K, QUANT_BLOCK)
    if tuple(xs.shape) != (*xq.shape[:-1], nk):
        raise ValueError(f"xs must be {(*xq.shape[:-1], nk)} (one scale per token per {QUANT_BLOCK}), "
                         f"got {tuple(xs.shape)}")
    if tuple(ws.shape) != (cdiv(N, QUANT_BLOCK), nk):
        raise ValueError(f"ws must be {(cdiv(N, QUANT_BLOCK), nk)} (one scale per {QUANT_BLOCK}x{QUANT_BLOCK} "
                         f"block), got {tuple(ws.shape)}")


def fp8_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek's reference for block FP8: dequantize both operands to fp32, then matmul."""
    check_gemm_operands(xq, xs, wq, ws)
    x = act_dequant_ref(xq, xs, QUANT_BLOCK)  # [..., K]
    w = weight_dequant_ref(wq, ws, QUANT_BLOCK)  # [N, K]
    return (x @ w.T).to(out_dtype)

# ---------------------------------------------------------------------------------------------- MoE routing
# T = tokens, E = experts, G = groups, k = top_k
def check_gate_args(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                scoring_func: str, topk_method: str,
                scoring_funcs: tuple[ScoringFunc, ...] = KERNEL_SCORING_FUNCS) -> None:
    """`scoring_funcs`: the scorings the caller computes (the kernel: softmax and sigmoid; `route_ref`: also V4's
    sqrtsoftplus), so the kernel rejects a scoring it would otherwise silently compute as softmax."""
    check_dtype("logits", logits, ACT_DTYPES)
    check_ndim("logits", logits, 2, "[T, E]")
    E = logits.shape[1]
    if bias is not None and (bias.shape != (E,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [E={E}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    if scoring_func not in scoring_funcs:
        raise ValueError(f"scoring_func must be one of {list(scoring_funcs)}, got {scoring_func!r}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {sorted(TOPK_METHODS)}, got {topk_method!r}")
    if topk_method != "greedy":
        if n_group < 1 or E % n_group:
            raise ValueError(f"n_group={n_group} must divide the {E} experts")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if topk_method == "noaux_tc" and E // n_group < 2:
            raise ValueError("noaux_tc scores a group by its top two experts: groups need >= 2 experts")
        eligible = topk_group * (E // n_group)
    else:
        eligible = E
    if not 1 <= top_k <= eligible:
        raise ValueError(f"top_k={top_k} must be in [1, {eligible}] (experts in the kept groups)")


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, in descending order; equal values go to the lower index.

    `torch.topk` leaves the order of ties unspecified (it differs between CPU and CUDA and between sizes), so the
    choice of an expert or group among equal scores would depend on the device. A stable sort pins it.
    """
    if x.shape[-1] <= _SORT_WIDTH or k >= x.shape[-1]:
        return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    # wide rows (an indexer over thousands of keys): topk is 3-4x faster than a full sort; it is only ambiguous
    # where equal values meet inside the top k or at its boundary, and those rows are re-done by the stable sort
    values, indices = x.topk(k, dim=-1)  # [..., k] descending
    tied = (x == values[..., -1:]).sum(dim=-1) > 1
    if k > 1:
        tied |= (values[..., 1:] == values[..., :-1]).any(dim=-1)
    if bool(tied.any()):
        indices[tied] = torch.sort(x[tied], dim=-1, descending=True, stable=True).indices[..., :k]
    return indices


_SORT_WIDTH = 256  # up to this many entries per row a stable sort costs no more than topk + the tie check


def route_ref(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
              topk_group: int = 1, scoring_func: ScoringFunc = "softmax", topk_method: TopkMethod = "greedy",
              norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0, mask: torch.Tensor | None = None,
              force: torch.Tensor | None = None,
              norm_single: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's MoE routing (V2 `MoEGate`, V3 `noaux_tc`, V4's `Gate`); the model's torch routing is this function.

    1. scores = softmax (V2), sigmoid (V3) or sqrt(softplus) (V4, `router_scores_ref`) of the fp32 logits.
    2. choice = scores + `bias` (V3's `e_score_correction_bias`): the bias steers which experts win, never their
       weight. `mask` [E] bool (optional) removes experts (False = ablated) from the choice.
    3. With `n_group` > 1 and a group method, a group scores its max ("group_limited_greedy") or the sum of its
       two best ("noaux_tc"); only the best `topk_group` groups stay.
    4. The `top_k` best by choice; `force` [f] (optional) ids take the first f slots whatever their score or
       group (groups are picked before forcing, so a forced expert does not pull its group in).
    5. weights = the unbiased scores of the chosen experts, divided by their sum (+1e-20) when `norm_topk_prob`
       and top_k > 1 (as DeepSeek's MoEGate), or with `norm_single` also when top_k == 1 (V4's gate divides
       always), times `routed_scaling_factor`.
    Ties (equal choice scores, equal group scores) go to the lower expert / group index (`top_indices`).

    Returns (scores [T, E] fp32, expert ids [T, k] int64 in choice order, weights [T, k] fp32).
    """
    check_gate_args(logits, bias, top_k, n_group, topk_group, scoring_func, topk_method, SCORING_FUNCS)
    T, E = logits.shape
    scores = router_scores_ref(logits, scoring_func)  # [T, E]
    choice = scores if bias is None else scores + bias.float()  # [T, E]
    if mask is not None:
        choice = choice.masked_fill(~mask, float("-inf"))
    if n_group > 1 and topk_method != "greedy":
        grouped = choice.view(T, n_group, E // n_group)  # [T, G, E/G]
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G] (values only: ties do not matter)
        else:
            group_scores = grouped.amax(dim=-1)  # [T, G]
        kept = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        kept.scatter_(1, top_indices(group_scores, topk_group), True)  # [T, G]
        choice = grouped.masked_fill(~kept[:, :, None], float("-inf")).view(T, E)  # experts of dropped groups out
    if force is not None and force.numel() > 0:
        rest = top_indices(choice.index_fill(1, force, float("-inf")), top_k - force.numel())  # [T, k-f]
        ids = torch.cat([force.to(rest.dtype).expand(T, -1), rest], dim=1)  # [T, k]
    else:
        ids = top_indices(choice, top_k)  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if norm_topk_prob and (top_k > 1 or norm_single):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, ids, weights * routed_scaling_factor


def hash_route_ref(logits: torch.Tensor, ids: torch.Tensor, *, scoring_func: ScoringFunc = "sqrtsoftplus",
                   norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V4's hash routing: the experts are given (`ids` [T, k] = tid2eid[token id]), only their weights are computed.

    weights = the scores of those experts, divided by their sum (+1e-20) when `norm_topk_prob` (V4: always, for
    any k), times `routed_scaling_factor`. `mask` [E] bool (False = ablated) zeroes the weight of ablated experts
    before the division, so the others share the token's whole weight (the slots stay: selection is fixed).
    Returns (scores [T, E] fp32, ids [T, k] int64, weights [T, k] fp32), as `route_ref` does.
    """
    check_ndim("logits", logits, 2, "[T, E]")
    T, E = logits.shape
    if ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"hash routing: ids must be [T={T}, k], got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise ValueError(f"hash routing: expert ids must be in [0, {E}), got {int(ids.min())}..{int(ids.max())}")
    scores = router_scores_ref(logits, scoring_func)  # [T, E]
    ids = ids.long()
    weights = scores.gather(1, ids)  # [T, k]
    if mask is not None:
        weights = weights.masked_fill(~mask[ids], 0.0)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, ids, weights * routed_scaling_factor


def router_scores_ref(logits: torch.Tensor, scoring_func: ScoringFunc) -> torch.Tensor:
    """The gate's scores [T, E] fp32 from its logits: softmax over experts (V2), sigmoid (V3), or V4's
    sqrt(softplus(logits)), which keeps every score positive and, unlike sigmoid, unbounded above."""
    lf = logits.float()
    if scoring_func == "sigmoid":
        return lf.sigmoid()
    if scoring_func == "sqrtsoftplus":
        return F.softplus(lf).sqrt()
    return lf.softmax(dim=-1)


def moe_gate_ref(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
                 topk_group: int = 1, scoring_func: ScoringFunc = "softmax", topk_method: TopkMethod = "greedy",
                 norm_topk_prob: bool = False,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch `moe_gate`: `route_ref`'s (ids [T, k], weights [T, k]) and the per-expert counts [E] int32."""
    _, ids, weights = route_ref(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                scoring_func=scoring_func, topk_method=topk_method, norm_topk_prob=norm_topk_prob,
                                routed_scaling_factor=routed_scaling_factor)
    return ids, weights, torch.bincount(ids.flatten(), minlength=logits.shape[1]).to(torch.int32)


# ---------------------------------------------------------------------------------------------- fused routed experts
# T = tokens, H = hidden, I = expert intermediate size, E = experts, k = top_k
def check_fused_moe_args(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                expert_ids: torch.Tensor, weights: torch.Tensor, scales: tuple[torch.Tensor | None, ...]) -> bool:
    """Validate shapes and dtypes; return whether the weights are FP8."""
    check_dtype("x", x, ACT_DTYPES)
    check_ndim("x", x, 2, "[T, H]")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_ndim(name, w, 3, "[E, out, in]")
        check_dtype(name, w, (x.dtype, *FP8_MAX))
    T, H = x.shape
    E, I = w_gate.shape[:2]
    if w_gate.shape != (E, I, H) or w_up.shape != (E, I, H) or w_down.shape != (E, H, I):
        raise ValueError(f"with x [T, H={H}] need w_gate, w_up [E, I, H] and w_down [E, H, I], got "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if len({w_gate.dtype, w_up.dtype, w_down.dtype}) != 1:
        raise ValueError("w_gate, w_up and w_down must share one dtype")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or weights.shape != expert_ids.shape:
        raise ValueError(f"expert_ids and weights must both be [T={T}, k], got {tuple(expert_ids.shape)} and "
                         f"{tuple(weights.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    fp8 = w_gate.dtype in FP8_MAX
    if fp8:
        up_grid = (E, cdiv(I, QUANT_BLOCK), cdiv(H, QUANT_BLOCK))
        want = (up_grid, up_grid, (E, cdiv(H, QUANT_BLOCK), cdiv(I, QUANT_BLOCK)))
        for name, s, shape in zip(("w_gate_scale", "w_up_scale", "w_down_scale"), scales, want, strict=True):
            if s is None or tuple(s.shape) != shape or s.dtype != torch.float32:
                got = None if s is None else (s.dtype, tuple(s.shape))
                raise ValueError(f"FP8 weights need {name} fp32 {shape} (one per 128x128 block), got {got}")
    elif any(s is not None for s in scales):
        raise ValueError("weight scales were given but the weights are not FP8")
    return fp8


def fused_moe_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  expert_ids: torch.Tensor, weights: torch.Tensor, *, w_gate_scale: torch.Tensor | None = None,
                  w_up_scale: torch.Tensor | None = None, w_down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over experts in plain torch; fp32 math, the intermediate rounded to x's dtype; FP8 as DeepSeek does."""
    scales = (w_gate_scale, w_up_scale, w_down_scale)
    fp8 = check_fused_moe_args(x, w_gate, w_up, w_down, expert_ids, weights, scales)
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(w_gate.shape[0]):
        tok, slot = torch.where(expert_ids == e)
        if tok.numel() == 0:
            continue
        if fp8:
            xe = act_dequant_ref(*act_quant_ref(x[tok]))  # [n, H]
            wg, wu, wd = (weight_dequant_ref(w[e], s[e]) for w, s in zip((w_gate, w_up, w_down), scales, strict=True)
                          if s is not None)
        else:
            xe = x[tok].float()
            wg, wu, wd = w_gate[e].float(), w_up[e].float(), w_down[e].float()
        h = (F.silu(xe @ wg.T) * (xe @ wu.T)).to(x.dtype)  # [n, I]
        he = act_dequant_ref(*act_quant_ref(h)) if fp8 else h.float()
        out.index_add_(0, tok, (he @ wd.T) * weights[tok, slot].float()[:, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- MLA decode
# B = sequences, nH = heads, C = latent (kv_lora_rank), R = rope dim, S = cache slots
def check_mla_decode_args(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                lengths: torch.Tensor) -> None:
    for name, t, legend in (("q_latent", q_latent, "[B, nH, C]"), ("q_pe", q_pe, "[B, nH, R]"),
                            ("c_kv", c_kv, "[B, S_max, C]"), ("k_pe", k_pe, "[B, S_max, R]")):
        check_ndim(name, t, 3, legend)
        check_dtype(name, t, ACT_DTYPES)
    if len({q_latent.dtype, q_pe.dtype, c_kv.dtype, k_pe.dtype}) != 1:
        raise ValueError("q_latent, q_pe, c_kv and k_pe must share one dtype")
    B, nH, C = q_latent.shape
    S_max, R = c_kv.shape[1], k_pe.shape[2]
    if q_pe.shape != (B, nH, R) or c_kv.shape != (B, S_max, C) or k_pe.shape != (B, S_max, R):
        raise ValueError(f"shapes disagree: q_latent {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}")
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > S_max):
        raise ValueError(f"lengths must be in [1, S_max={S_max}], got {lengths.tolist()}")


def mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                   lengths: torch.Tensor, softmax_scale: float,
                   return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `mla_decode` in fp32, one sequence at a time (DeepSeek's absorb-path einsums)."""
    check_mla_decode_args(q_latent, q_pe, c_kv, k_pe, lengths)
    B, nH, C = q_latent.shape
    out = torch.empty(B, nH, C, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(B, nH, dtype=torch.float32, device=q_latent.device)
    for b in range(B):
        L = int(lengths[b])
        kv, kp = c_kv[b, :L].float(), k_pe[b, :L].float()  # [L, C], [L, R]
        scores = (torch.einsum("hc,sc->hs", q_latent[b].float(), kv)
                  + torch.einsum("hr,sr->hs", q_pe[b].float(), kp)) * softmax_scale  # [nH, L]
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("hs,sc->hc", scores.softmax(dim=-1), kv)
    out = out.to(q_latent.dtype)
    return (out, lse) if return_lse else out
