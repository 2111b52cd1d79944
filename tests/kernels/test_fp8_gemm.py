"""Block-scaled FP8 GEMM vs dequantize-then-matmul.

Tolerance: both sides multiply the same FP8 values exactly (e4m3/e5m2 products fit in fp32) and differ only in
summation order and where the scales are applied. Any fp32 summation order is within K * eps32 * (|x| @ |w|^T)
of the exact sum (the standard worst-case bound), so that is the bound we test against, element by element.
"""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.fp8_gemm import fp8_gemm
from workbench_kernels.reference import act_dequant_ref, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref

EPS32 = torch.finfo(torch.float32).eps


def _operands(M, N, K, fmt, device):
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) * 0.05
    xq, xs = act_quant_ref(x, fmt=fmt)
    wq, ws = weight_quant_ref(w, fmt=fmt)
    return xq, xs, wq, ws


@pytest.mark.parametrize(("M", "N", "K"), [(1, 128, 128), (5, 200, 300), (33, 130, 7), (17, 64, 257)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_gemm_matches_ref(M, N, K, fmt, device) -> None:
    xq, xs, wq, ws = _operands(M, N, K, fmt, device)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    y_ref = fp8_gemm_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    bound = K * EPS32 * (act_dequant_ref(xq, xs).abs() @ weight_dequant_ref(wq, ws).abs().T)
    assert y.shape == (M, N)
    assert torch.all((y - y_ref).abs() <= bound + 1e-30)


def test_fp8_gemm_bf16_output_and_batch_dims(device) -> None:
    xq, xs, wq, ws = _operands(6, 96, 200, "e4m3", device)
    y = fp8_gemm(xq.view(2, 3, 200), xs.view(2, 3, 2), wq, ws)
    y_ref = fp8_gemm_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    assert y.dtype == torch.bfloat16
    assert y.shape == (2, 3, 96)
    # one bf16 rounding of a value within the fp32 bound above: at most one bf16 ulp (2^-7 relative) apart
    torch.testing.assert_close(y.view(6, 96).float(), y_ref, rtol=2.0 ** -7, atol=1e-6)


def test_fp8_gemm_errors(device) -> None:
    xq, xs, wq, ws = _operands(4, 64, 200, "e4m3", device)
    with pytest.raises(ValueError, match="xq has dtype"):
        fp8_gemm(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="ws must be"):
        fp8_gemm(xq, xs, wq, ws[:, :1])
    with pytest.raises(ValueError, match="xs must be"):
        fp8_gemm(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match=r"wq \[N, K\]"):
        fp8_gemm(xq, xs, wq[:, :100], ws)
    with pytest.raises(ValueError, match="out has dtype"):
        fp8_gemm(xq, xs, wq, ws, out_dtype=torch.int32)
