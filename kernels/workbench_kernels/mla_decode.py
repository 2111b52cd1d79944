"""MLA decode attention over the compressed latent cache, with the up-projections absorbed into q and out.

DeepSeek's "absorb" path caches only c_kv (the kv_lora_rank latent, C = 512 in V3) and the shared rope key
k_pe (R = 64). With W_UK folded into the query and W_UV applied after attention, one decode step is
    score[h, s] = (q_latent[h] . c_kv[s] + q_pe[h] . k_pe[s]) * softmax_scale
    out[h]      = sum_s softmax(score[h])[s] * c_kv[s]          (still in latent space, [nH, C])
so every head reads the same cache rows: the kernel processes a block of heads per program, making the two
score products and the output product small matrix multiplies instead of per-head vector products.

A decode batch has few queries and long sequences, so the sequence is split across programs (flash-decoding):
each split writes its normalised partial output and log-sum-exp, and a second kernel merges the splits with
weights exp(lse_i - max lse). Splits past a sequence's length write lse = -inf and get weight 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, check_launchable
from .reference import check_mla_decode_args

# B = sequences, nH = heads, C = latent (kv_lora_rank), R = rope dim, S = cache slots, NS = splits


@triton.jit
def mla_decode_split_kernel(q_ptr, qpe_ptr, ckv_ptr, kpe_ptr, len_ptr, o_part_ptr, lse_part_ptr,
                            n_heads, S_max, C, R, split_len, n_splits, scale, PRECISION: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    hb = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    start = sp * split_len
    end = tl.minimum(start + split_len, length)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < n_heads
    mask_c = offs_c < C
    mask_r = offs_r < R
    q = tl.load(q_ptr + (b * n_heads + offs_h[:, None]) * C + offs_c[None, :],
                mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # [BH, BC]
    q_pe = tl.load(qpe_ptr + (b * n_heads + offs_h[:, None]) * R + offs_r[None, :],
                   mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BH, BR]
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        kv = tl.load(ckv_ptr + (b * S_max + offs_s[:, None]) * C + offs_c[None, :],
                     mask=mask_s[:, None] & mask_c[None, :], other=0.0)  # [BS, BC]
        k_pe = tl.load(kpe_ptr + (b * S_max + offs_s[:, None]) * R + offs_r[None, :],
                       mask=mask_s[:, None] & mask_r[None, :], other=0.0)  # [BS, BR]
        score = tl.dot(q, tl.trans(kv), input_precision=PRECISION)
        score = tl.dot(q_pe, tl.trans(k_pe), score, input_precision=PRECISION) * scale  # [BH, BS]
        score = tl.where(mask_s[None, :], score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    empty = l == 0.0  # split entirely past this sequence's length
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    part = (b * n_heads + offs_h) * n_splits + sp  # [BH] index into [B, nH, NS]
    tl.store(o_part_ptr + part[:, None] * C + offs_c[None, :], out, mask=mask_h[:, None] & mask_c[None, :])
    tl.store(lse_part_ptr + part, lse, mask=mask_h)


@triton.jit
def mla_decode_merge_kernel(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, n_heads, C, n_splits,
                            BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_NS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_ns = tl.arange(0, BLOCK_NS)
    mask_h = offs_h < n_heads
    mask_c = offs_c < C
    rows = b * n_heads + offs_h  # [BH]
    lse = tl.load(lse_part_ptr + rows[:, None] * n_splits + offs_ns[None, :],
                  mask=mask_h[:, None] & (offs_ns[None, :] < n_splits), other=float("-inf"))  # [BH, BNS]
    lse_max = tl.max(lse, axis=1)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # only for padded heads
    w = tl.exp(lse - lse_max[:, None])
    w_sum = tl.sum(w, axis=1)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for sp in range(n_splits):
        w_sp = tl.sum(tl.where(offs_ns[None, :] == sp, w, 0.0), axis=1)  # [BH]
        o = tl.load(o_part_ptr + (rows[:, None] * n_splits + sp) * C + offs_c[None, :],
                    mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        acc += w_sp[:, None] * o
    w_sum = tl.where(w_sum == 0.0, 1.0, w_sum)  # only for padded heads
    out = acc / w_sum[:, None]
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_h[:, None] & mask_c[None, :])
    tl.store(lse_ptr + rows, lse_max + tl.log(w_sum), mask=mask_h)


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               lengths: torch.Tensor, softmax_scale: float, num_splits: int | None = None,
               return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step of absorbed MLA attention.

    Args:
        q_latent: [B, nH, C] query times W_UK (latent space); q_pe: [B, nH, R] rope part of the query.
        c_kv: [B, S_max, C] latent cache; k_pe: [B, S_max, R] rope key cache; rows >= lengths[b] are ignored.
        lengths: [B] valid cache rows per sequence, 1 <= length <= S_max.
        softmax_scale: usually (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 times the YaRN mscale^2.
        num_splits: sequence splits per batch row (default: enough programs to fill the device).

    Returns:
        out: [B, nH, C] in the input dtype (multiply by W_UV, then W_O, outside); with `return_lse`
        also lse: [B, nH] fp32 log-sum-exp of the scores.
    """
    check_mla_decode_args(q_latent, q_pe, c_kv, k_pe, lengths)
    check_launchable(mla_decode_split_kernel, q_latent, q_pe, c_kv, k_pe, lengths)
    B, nH, C = q_latent.shape
    S_max, R = c_kv.shape[1], k_pe.shape[2]
    block_s, block_h = 64, 16
    head_blocks = cdiv(nH, block_h)
    if num_splits is None:
        programs = 2 * torch.cuda.get_device_properties(c_kv.device).multi_processor_count if c_kv.is_cuda else 4
        num_splits = cdiv(programs, max(1, B * head_blocks))
    num_splits = max(1, min(num_splits, cdiv(S_max, block_s)))
    split_len = cdiv(cdiv(S_max, num_splits), block_s) * block_s
    device = q_latent.device
    o_part = torch.empty(B, nH, num_splits, C, dtype=torch.float32, device=device)
    lse_part = torch.empty(B, nH, num_splits, dtype=torch.float32, device=device)
    out = torch.empty(B, nH, C, dtype=q_latent.dtype, device=device)
    lse = torch.empty(B, nH, dtype=torch.float32, device=device)
    if B == 0 or nH == 0:
        return (out, lse) if return_lse else out
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    block_c, block_r = triton.next_power_of_2(C), max(16, triton.next_power_of_2(R))
    mla_decode_split_kernel[(B, num_splits, head_blocks)](
        q_latent.contiguous(), q_pe.contiguous(), c_kv.contiguous(), k_pe.contiguous(), lengths.contiguous(),
        o_part, lse_part, nH, S_max, C, R, split_len, num_splits, float(softmax_scale), PRECISION=precision,
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_R=block_r)
    mla_decode_merge_kernel[(B, head_blocks)](
        o_part, lse_part, out, lse, nH, C, num_splits,
        BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_NS=triton.next_power_of_2(num_splits))
    return (out, lse) if return_lse else out
