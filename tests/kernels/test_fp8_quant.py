"""FP8 block quantization kernels vs the plain-torch references.

Tolerance: none. Both sides compute the same fp32 amax, scale and division (IEEE, so bit-identical) and then
round with torch's round-to-nearest-even cast (the interpreter's own cast is replaced in conftest), so the FP8
codes and the scales must be bit-equal.
"""

from __future__ import annotations

import pytest
import torch

from workbench_kernels._runtime import KernelUnavailableError
from workbench_kernels.fp8_quant import act_quant, weight_dequant, weight_quant
from workbench_kernels.reference import act_dequant_ref, act_quant_ref, pow2_ceil_ref, weight_dequant_ref, weight_quant_ref


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("shape", [(3, 128), (5, 200), (2, 3, 300), (1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_matches_ref(shape, dtype, fmt, ue8m0, device) -> None:
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype).to(device)
    q, s = act_quant(x, fmt=fmt, ue8m0=ue8m0)
    q_ref, s_ref = act_quant_ref(x, fmt=fmt, ue8m0=ue8m0)
    assert q.shape == x.shape
    assert s.shape == (*x.shape[:-1], -(-x.shape[-1] // 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


def test_act_quant_small_block_and_zero_tile(device) -> None:
    x = torch.randn(4, 100, device=device)
    x[1] = 0.0  # an all-zero tile takes the 1e-4 floor, not a division by zero
    q, s = act_quant(x, block=32)
    q_ref, s_ref = act_quant_ref(x, block=32)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.all(s[1] == torch.tensor(1e-4) / 448)
    assert torch.all(q[1].float() == 0)


def test_act_quant_roundtrip_error_is_fp8_sized(device) -> None:
    x = torch.randn(8, 256, device=device)
    q, s = act_quant(x)
    err = (act_dequant_ref(q, s) - x).abs() / x.abs().amax(dim=-1, keepdim=True)
    assert err.max() <= 2.0 ** -4  # e4m3: 3 mantissa bits, half-ulp relative to the tile max


def test_pow2_ceil_matches_deepseek_log2_formula() -> None:
    s = torch.cat([torch.rand(1000) * 10, torch.tensor([0.25, 1.0, 2.0 ** -20, 3.0])])
    assert torch.equal(pow2_ceil_ref(s), torch.exp2(torch.ceil(torch.log2(s.double()))).float())


@pytest.mark.parametrize(("N", "K"), [(128, 128), (200, 130), (576, 300), (33, 7)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_quant_and_dequant_match_ref(N, K, fmt, dtype, device) -> None:
    w = (torch.randn(N, K) * 0.02).to(dtype).to(device)
    q, s = weight_quant(w, fmt=fmt)
    q_ref, s_ref = weight_quant_ref(w, fmt=fmt)
    assert s.shape == (-(-N // 128), -(-K // 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))
    for out_dtype in (torch.float32, torch.bfloat16):
        w_deq = weight_dequant(q, s, out_dtype=out_dtype)
        assert torch.equal(w_deq, weight_dequant_ref(q, s, out_dtype=out_dtype))


def test_weight_quant_ue8m0(device) -> None:
    w = torch.randn(130, 260, device=device)
    q, s = weight_quant(w, ue8m0=True)
    q_ref, s_ref = weight_quant_ref(w, ue8m0=True)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)


def test_dequant_of_partial_last_block_uses_its_own_scale(device) -> None:
    # V3's kv_a_proj_with_mqa is 576 x 7168: 4.5 row blocks; the half block must not borrow a neighbour's scale
    q = torch.ones(192, 130, device=device).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    w = weight_dequant(q, s)
    assert w[191, 129] == 4.0
    assert w[127, 129] == 2.0
    assert w[128, 0] == 3.0


def test_errors(device) -> None:
    with pytest.raises(ValueError, match="dtype"):
        act_quant(torch.zeros(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="fmt"):
        act_quant(torch.zeros(2, 4, device=device), fmt="e3m4")
    with pytest.raises(ValueError, match="block"):
        act_quant(torch.zeros(2, 4, device=device), block=100)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        weight_quant(torch.zeros(2, 4, 4, device=device))
    q = torch.zeros(576, 300, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs \(5, 3\)"):
        weight_dequant(q, torch.ones(4, 3, device=device))
    with pytest.raises(ValueError, match="dtype"):
        weight_dequant(q.float(), torch.ones(5, 3, device=device))


def test_clear_error_without_triton_backend(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        act_quant(torch.zeros(2, 4))
