"""Block-scaled FP8 GEMM y = x @ W^T, the DeepSeek-V3 recipe.

Activations carry one fp32 scale per token per 128 columns, weights one per 128x128 block. Each 128-wide slice
of K is multiplied in FP8 on the tensor cores, and the partial sum is promoted to fp32, scaled by
x_scale[m] * w_scale[n], and added to an fp32 accumulator: the "promotion every 128 elements" that V3's paper
uses to avoid the limited accumulation precision of FP8 MMA. M, N and K need not be multiples of anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import ACT_DTYPES, cdiv, check_dtype, check_launchable
from .reference import QUANT_BLOCK, check_gemm_operands

# M = tokens, N = output features, K = input features


@triton.jit
def fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(n_kblocks):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * K + k[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        a_s = tl.load(xs_ptr + offs_m * n_kblocks + kb, mask=mask_m, other=0.0)  # [BM]
        b_s = tl.load(ws_ptr + (offs_n // BLOCK_K) * n_kblocks + kb, mask=mask_n, other=0.0)  # [BN]
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # [BM, BK] @ [BK, BN], fp32 promotion per K block
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = dequant(xq, xs) @ dequant(wq, ws)^T with fp32 accumulation.

    Args:
        xq: [..., K] FP8 activations, from `act_quant`.
        xs: [..., ceil(K/128)] fp32 scales.
        wq: [N, K] FP8 weight, from `weight_quant` or a DeepSeek checkpoint.
        ws: [ceil(N/128), ceil(K/128)] fp32 `weight_scale_inv`.
        out_dtype: dtype of y (DeepSeek returns bf16).

    Returns:
        y: [..., N].
    """
    check_gemm_operands(xq, xs, wq, ws)
    check_dtype("out", torch.empty(0, dtype=out_dtype), ACT_DTYPES)
    check_launchable(fp8_gemm_kernel, xq, xs, wq, ws)
    N, K = wq.shape
    x2 = xq.reshape(-1, K).contiguous()  # [M, K]
    s2 = xs.reshape(-1, xs.shape[-1]).contiguous()  # [M, nk]
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if y.numel():
        block_m = max(16, min(64, triton.next_power_of_2(M)))
        block_n = 128
        grid = (cdiv(M, block_m), cdiv(N, block_n))
        fp8_gemm_kernel[grid](x2, s2, wq.contiguous(), ws.contiguous(), y, M, N, K,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=QUANT_BLOCK)
    return y.view(*xq.shape[:-1], N)
