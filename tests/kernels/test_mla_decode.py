"""MLA decode (split-K + log-sum-exp merge) vs per-sequence softmax attention in fp32.

Tolerances: fp32 differs only in summation order and exp ulps: rtol/atol 1e-5. bf16: the kernel rounds the
softmax weights to bf16 before the p @ c_kv product (as FlashMLA does), up to 2^-9 relative each, and the
output is a convex combination of c_kv rows rounded to bf16: |error| <= ~2^-8 max|c_kv| + one bf16 ulp, so
atol 2^-7 * max|c_kv|, rtol 2^-7.
"""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.mla_decode import mla_decode
from workbench_kernels.reference import mla_decode_ref


def _problem(B, nH, C, R, S_max, lengths, dtype, device):
    q = torch.randn(B, nH, C, device=device).to(dtype)
    q_pe = torch.randn(B, nH, R, device=device).to(dtype)
    c_kv = torch.randn(B, S_max, C, device=device).to(dtype)
    k_pe = torch.randn(B, S_max, R, device=device).to(dtype)
    c_kv[:, max(lengths):] = float("nan")  # rows past every length must never be read into the result
    return q, q_pe, c_kv, k_pe, torch.tensor(lengths, device=device)


@pytest.mark.parametrize(("B", "nH", "C", "R", "S_max", "lengths", "splits"), [
    (1, 16, 64, 16, 64, [1], 1),
    (3, 5, 80, 24, 200, [200, 1, 77], 3),
    (2, 20, 128, 64, 150, [130, 64], 4),
    (2, 3, 32, 8, 100, [5, 99], None),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_matches_ref(B, nH, C, R, S_max, lengths, splits, dtype, device) -> None:
    args = _problem(B, nH, C, R, S_max, lengths, dtype, device)
    scale = (C + R) ** -0.5
    c_kv_valid = torch.cat([args[2][b, :n] for b, n in enumerate(lengths)])
    out, lse = mla_decode(*args, softmax_scale=scale, num_splits=splits, return_lse=True)
    out_ref, lse_ref = mla_decode_ref(*args, softmax_scale=scale, return_lse=True)
    assert out.shape == (B, nH, C)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    else:
        bound = 2.0 ** -7 * c_kv_valid.float().abs().max().item()
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=2.0 ** -7, atol=bound)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-4 if dtype == torch.bfloat16 else 1e-5)


def test_split_count_does_not_change_result(device) -> None:
    args = _problem(2, 4, 32, 16, 256, [256, 100], torch.float32, device)
    outs = [mla_decode(*args, softmax_scale=0.1, num_splits=n) for n in (1, 2, 4)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_mla_decode_errors(device) -> None:
    q, q_pe, c_kv, k_pe, lengths = _problem(2, 4, 32, 16, 64, [3, 64], torch.float32, device)
    with pytest.raises(ValueError, match="lengths must be in"):
        mla_decode(q, q_pe, c_kv, k_pe, torch.tensor([0, 3], device=device), softmax_scale=1.0)
    with pytest.raises(ValueError, match="lengths must be in"):
        mla_decode(q, q_pe, c_kv, k_pe, torch.tensor([65, 3], device=device), softmax_scale=1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        mla_decode(q.bfloat16(), q_pe, c_kv, k_pe, lengths, softmax_scale=1.0)
    with pytest.raises(ValueError, match="c_kv has dtype"):
        mla_decode(q, q_pe, c_kv.double(), k_pe, lengths, softmax_scale=1.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        mla_decode(q, q_pe[:, :, :8], c_kv, k_pe, lengths, softmax_scale=1.0)
    with pytest.raises(ValueError, match=r"\[B, nH, C\]"):
        mla_decode(q[0], q_pe, c_kv, k_pe, lengths, softmax_scale=1.0)
