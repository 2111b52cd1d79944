"""Every launcher says clearly when Triton cannot run here, instead of failing inside Triton."""

from __future__ import annotations

import pytest
import torch

from workbench_kernels._runtime import KernelUnavailableError
from workbench_kernels.fp8_gemm import fp8_gemm
from workbench_kernels.fp8_quant import act_quant, weight_dequant, weight_quant
from workbench_kernels.fused_moe import fused_moe
from workbench_kernels.mla_decode import mla_decode
from workbench_kernels.moe_gate import moe_gate

q8 = torch.zeros(4, 128).to(torch.float8_e4m3fn)
s1 = torch.ones(4, 1)
w3 = torch.zeros(2, 32, 32)
CALLS = {
    "act_quant": lambda: act_quant(torch.zeros(2, 4)),
    "weight_quant": lambda: weight_quant(torch.zeros(4, 4)),
    "weight_dequant": lambda: weight_dequant(q8, torch.ones(1, 1)),
    "fp8_gemm": lambda: fp8_gemm(q8, s1, q8, torch.ones(1, 1)),
    "moe_gate": lambda: moe_gate(torch.zeros(3, 8), top_k=2),
    "fused_moe": lambda: fused_moe(torch.zeros(3, 32), w3, w3, w3, torch.zeros(3, 1, dtype=torch.int64),
                                   torch.ones(3, 1)),
    "mla_decode": lambda: mla_decode(torch.zeros(1, 2, 8), torch.zeros(1, 2, 4), torch.zeros(1, 5, 8),
                                     torch.zeros(1, 5, 4), torch.tensor([5]), softmax_scale=1.0),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_clear_error_without_cuda_or_interpreter(name, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET is not set"):
        CALLS[name]()
