"""Compiled kernels on a CUDA device at DeepSeek-V3 sizes, and a speed sanity check. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from workbench_kernels.fp8_gemm import fp8_gemm
from workbench_kernels.fp8_quant import act_quant, weight_quant
from workbench_kernels.mla_decode import mla_decode
from workbench_kernels.reference import act_quant_ref, fp8_gemm_ref, mla_decode_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_act_quant_compiled_is_bit_exact() -> None:
    x = torch.randn(512, 7168, dtype=torch.bfloat16, device="cuda")
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_ref(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_gemm_compiled_v3_kv_a_proj() -> None:
    # 576 x 7168: V3's kv_a_proj_with_mqa, whose rows are not a multiple of 128
    xq, xs = act_quant(torch.randn(200, 7168, device="cuda"))
    wq, ws = weight_quant(torch.randn(576, 7168, device="cuda") * 0.02)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(y, fp8_gemm_ref(xq, xs, wq, ws, out_dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_mla_decode_compiled_v3_dims() -> None:
    B, nH, C, R, S = 4, 16, 512, 64, 1000
    args = [torch.randn(*s, dtype=torch.bfloat16, device="cuda") for s in ((B, nH, C), (B, nH, R), (B, S, C), (B, S, R))]
    lengths = torch.tensor([1000, 1, 513, 64], device="cuda")
    out = mla_decode(*args, lengths, softmax_scale=0.07)
    ref = mla_decode_ref(*args, lengths, softmax_scale=0.07)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0 ** -7, atol=2.0 ** -7 * 5)


def test_fp8_gemm_beats_its_fp32_reference() -> None:
    import triton.testing

    xq, xs = act_quant(torch.randn(2048, 4096, device="cuda"))
    wq, ws = weight_quant(torch.randn(4096, 4096, device="cuda"))
    t_kernel = triton.testing.do_bench(lambda: fp8_gemm(xq, xs, wq, ws), return_mode="median")
    t_ref = triton.testing.do_bench(lambda: fp8_gemm_ref(xq, xs, wq, ws), return_mode="median")
    assert t_kernel < t_ref
