"""Fused routed-expert MLP: sort tokens by expert, one grouped GEMM for gate+up with SwiGLU, one for down.

Design choices:
- `moe_align` lays the (token, slot) pairs out expert by expert, each expert's run padded to a multiple of
  BLOCK_M, so that every row block of the grouped GEMMs belongs to one expert (vLLM's `moe_align_block_size`).
  It runs in torch without a host sync: the block count is bounded by ceil(pairs / BLOCK_M) + E and spare blocks
  are marked -1 and skipped.
- The gate and up projections share the gathered activation tile and run in one kernel that writes
  silu(gate) * up, rounded to the activation dtype as a bf16 model's MLP would round it.
- The down kernel multiplies each row by its routing weight and writes one row per (token, slot); the top-k sum
  is a plain sum over the slot dim, so no atomics and a deterministic result.
- FP8 weights ([E, out, in] FP8 with [E, ceil(out/128), ceil(in/128)] fp32 scales): activations are quantized
  per token per 128 (`act_quant`), before gate/up and again before down, and each K block of 128 is promoted to
  fp32 with both scales, as in `fp8_gemm`. The intermediate's quantization is fused into the gate/up kernel
  (its 128-wide output tile is one quantization tile per row), so it never exists in bf16 in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, check_launchable
from .fp8_quant import act_quant
from .reference import QUANT_BLOCK, check_fused_moe_args

# T = tokens, H = hidden, I = expert intermediate size, E = experts, k = top_k, P = T * k (token, slot) pairs

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def moe_gate_up_kernel(x_ptr, xs_ptr, wg_ptr, wu_ptr, wgs_ptr, wus_ptr, h_ptr, hs_ptr, sorted_ptr,
                       block_expert_ptr, P, H, I, TOP_K: tl.constexpr, FP8: tl.constexpr, ACT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)  # [BM] (token, slot) pair ids, P = padding
    valid = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    n_kblocks = tl.cdiv(H, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = e * I * H
    for kb in range(n_kblocks):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = k < H
        a = tl.load(x_ptr + tok[:, None] * H + k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        w_offs = w_base + offs_n[None, :] * H + k[:, None]  # [BK, BN]: W^T tile
        w_mask = mask_n[None, :] & mask_k[:, None]
        bg = tl.load(wg_ptr + w_offs, mask=w_mask, other=0.0)
        bu = tl.load(wu_ptr + w_offs, mask=w_mask, other=0.0)
        if FP8:
            a_s = tl.load(xs_ptr + tok * n_kblocks + kb, mask=valid, other=0.0)[:, None]  # [BM, 1]
            s_offs = (e * tl.cdiv(I, BLOCK_K) + offs_n // BLOCK_K) * n_kblocks + kb
            g_s = tl.load(wgs_ptr + s_offs, mask=mask_n, other=0.0)[None, :]  # [1, BN]
            u_s = tl.load(wus_ptr + s_offs, mask=mask_n, other=0.0)[None, :]
            acc_g += tl.dot(a, bg) * a_s * g_s
            acc_u += tl.dot(a, bu) * a_s * u_s
        else:
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BM, BN] SwiGLU: silu(gate) * up
    rows64 = rows.to(tl.int64)
    if FP8:  # fused act_quant: BLOCK_N == 128, so this tile is one 1x128 quantization tile per row
        h = h.to(ACT_DTYPE).to(tl.float32)  # the activation dtype's rounding, as the unfused path has it
        s = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-4) / 448.0  # [BM]; masked columns are 0
        h = tl.clamp(h / s[:, None], -448.0, 448.0)
        tl.store(hs_ptr + rows64 * tl.cdiv(I, BLOCK_N) + pid_n, s)
    tl.store(h_ptr + rows64[:, None] * I + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def moe_down_kernel(h_ptr, hs_ptr, wd_ptr, wds_ptr, route_w_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                    P, H, I, FP8: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    n_kblocks = tl.cdiv(I, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(n_kblocks):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = k < I
        a = tl.load(h_ptr + rows64[:, None] * I + k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(wd_ptr + e * H * I + offs_n[None, :] * I + k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0)
        if FP8:
            a_s = tl.load(hs_ptr + rows64 * n_kblocks + kb, mask=valid, other=0.0)[:, None]
            b_s = tl.load(wds_ptr + (e * tl.cdiv(H, BLOCK_K) + offs_n // BLOCK_K) * n_kblocks + kb, mask=mask_n,
                          other=0.0)[None, :]
            acc += tl.dot(a, b) * a_s * b_s
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    route_w = tl.load(route_w_ptr + pair, mask=valid, other=0.0)  # [BM]
    acc = acc * route_w[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * H + offs_n[None, :], acc, mask=valid[:, None] & mask_n[None, :])


def moe_align(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, padding each expert's run to a multiple of `block_m`.

    Returns:
        sorted_pairs: [n_blocks * block_m] int32 pair ids (t * k + slot); P marks padding.
        block_expert: [n_blocks] int32 expert of each row block; -1 for spare blocks.
    """
    flat = expert_ids.flatten()  # [P]
    P = flat.numel()
    device = flat.device
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded  # [E]
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)  # [P] pairs, expert by expert
    expert_of = flat[order]
    dest = padded_start[expert_of] + torch.arange(P, device=device) - start[expert_of]
    n_blocks = cdiv(P, block_m) + n_experts  # upper bound on sum(ceil(counts / block_m)): no host sync
    sorted_pairs = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_end = torch.cumsum(padded, 0) // block_m  # [E] first block after each expert
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=device), right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def fused_moe(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              expert_ids: torch.Tensor, weights: torch.Tensor, *, w_gate_scale: torch.Tensor | None = None,
              w_up_scale: torch.Tensor | None = None, w_down_scale: torch.Tensor | None = None,
              block_m: int | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, j].

    Args:
        x: [T, H] activations (fp32, bf16 or fp16).
        w_gate, w_up: [E, I, H]; w_down: [E, H, I]; x's dtype, or FP8 with the three `*_scale` grids.
        expert_ids, weights: [T, k] from the gate.
        block_m: rows per expert block (default: 16 on CPU, 64 on GPU).

    Returns:
        y: [T, H] in x's dtype.
    """
    scales = (w_gate_scale, w_up_scale, w_down_scale)
    fp8 = check_fused_moe_args(x, w_gate, w_up, w_down, expert_ids, weights, scales)
    check_launchable(moe_gate_up_kernel, x, w_gate, w_up, w_down, expert_ids, weights)
    T, H = x.shape
    E, I = w_gate.shape[:2]
    k = expert_ids.shape[1]
    P = T * k
    if P == 0:
        return torch.zeros_like(x)
    if block_m is None:
        block_m = 64 if x.is_cuda else 16
    sorted_pairs, block_expert = moe_align(expert_ids, E, block_m)
    n_blocks = block_expert.numel()
    x = x.contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if fp8:
        block_k = QUANT_BLOCK
        xq, xs = act_quant(x)  # [T, H], [T, ceil(H/128)]
        a_in, a_scale = xq, xs
        sg, su, sd = (s.contiguous() for s in scales if s is not None)
    else:
        block_k = 64 if max(H, I) >= 64 else 32
        a_in, a_scale = x, x
        sg = su = sd = x
    rows = n_blocks * block_m
    block_n = QUANT_BLOCK if fp8 else 64
    # [rows, I] intermediate, padding rows = 0; FP8: its e4m3 codes and [rows, ceil(I/128)] scales
    h = torch.empty(rows, I, dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    h_scale = torch.empty(rows, cdiv(I, QUANT_BLOCK), dtype=torch.float32, device=x.device) if fp8 else h
    moe_gate_up_kernel[(n_blocks, cdiv(I, block_n))](
        a_in, a_scale, w_gate.contiguous(), w_up.contiguous(), sg, su, h, h_scale, sorted_pairs, block_expert,
        P, H, I, TOP_K=k, FP8=fp8, ACT_DTYPE=_TL_DTYPE[x.dtype], PRECISION=precision, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k)
    out = torch.zeros(P, H, dtype=torch.float32, device=x.device)  # [P, H] one row per (token, slot)
    route_w = weights.float().contiguous()
    moe_down_kernel[(n_blocks, cdiv(H, block_n))](
        h, h_scale, w_down.contiguous(), sd, route_w, out, sorted_pairs, block_expert, P, H, I,
        FP8=fp8, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(T, k, H).sum(dim=1).to(x.dtype)
