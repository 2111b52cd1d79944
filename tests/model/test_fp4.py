"""The e2m1 FP4 codec: packing order, the value table, round-to-nearest-even, power-of-two block scales, and
agreement with transformers' FP4 unpacking and dequantization."""

from __future__ import annotations

import pytest
import torch

from workbench.model.fp4 import (
    E2M1_VALUES,
    FP4_BLOCK,
    dequantize_fp4,
    e2m1_codes,
    e2m1_values,
    fake_quant_fp4,
    fp4_scales,
    pack_fp4,
    quantize_fp4,
    unpack_fp4,
)

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nearest_even_ref(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the grid value nearest |x| (clamped to 6), a tie going to the even code; sign of x kept."""
    m = x.abs().clamp(max=6.0)
    dist = (m[..., None] - GRID).abs()  # [..., 8]
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    even = tied & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.int().argmax(-1), tied.int().argmax(-1))
    return torch.where(torch.signbit(x), -GRID[code], GRID[code])


def test_the_table_and_the_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1_values(codes).tolist() == list(E2M1_VALUES)
    assert torch.signbit(e2m1_values(codes[8:9])).item()  # code 8 is -0
    # byte 0x21 holds code 1 in the low nibble (column 0) and code 2 in the high one (column 1)
    assert unpack_fp4(torch.tensor([[0x21]], dtype=torch.uint8).view(torch.int8)).tolist() == [[1, 2]]
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.int8).reshape(4, 64)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)


def test_unpack_and_dequantize_agree_with_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    tf = Fp8Dequantize(hf_quantizer=None)
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.int8).reshape(4, 64)
    assert torch.equal(e2m1_values(unpack_fp4(every_byte)), tf._unpack_fp4(every_byte))
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (3, 16, 48), generator=g, dtype=torch.int8)  # 3 experts, 96 values per row
    scale = torch.exp2(torch.randint(-12, 4, (3, 16, 3), generator=g).float()).to(torch.float8_e8m0fnu)
    ours = dequantize_fp4(packed, scale)
    theirs = torch.stack([tf._dequantize_one(packed[e], scale[e], output_dtype=torch.float32) for e in range(3)])
    assert torch.equal(ours, theirs)


def test_rounding_is_to_nearest_with_ties_to_even():
    midpoints = (GRID[1:] + GRID[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
    assert e2m1_values(e2m1_codes(midpoints)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_values(e2m1_codes(-midpoints)).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert e2m1_codes(torch.tensor([-0.0, 0.0, 7.5, -100.0])).tolist() == [8, 0, 7, 15]  # -0 keeps its sign; saturates
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=g) * 3, midpoints + 1e-7, midpoints - 1e-7, GRID, -GRID])
    assert torch.equal(e2m1_values(e2m1_codes(x)), _nearest_even_ref(x))


def test_quantize_picks_the_smallest_power_of_two_that_holds_each_block():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, 4 * FP4_BLOCK, generator=g) * torch.exp2(torch.randint(-20, 20, (5, 7, 1), generator=g))
    x[0, 0, :FP4_BLOCK] = 0.0  # an all-zero block: the clamped smallest scale, codes 0
    packed, scale = quantize_fp4(x)
    assert packed.shape == (5, 7, 2 * FP4_BLOCK) and packed.dtype == torch.int8
    assert scale.shape == (5, 7, 4) and scale.dtype == torch.float8_e8m0fnu
    s = scale.float()
    amax = x.unflatten(-1, (4, FP4_BLOCK)).abs().amax(-1)
    live = amax > 0
    assert torch.equal(torch.exp2(torch.log2(s)), s)  # powers of two
    assert bool((amax[live] / s[live] <= 6).all()) and bool((amax[live] / s[live] > 3).all())  # no smaller one fits
    assert s[0, 0, 0].item() == 2.0**-126
    blocks = x.unflatten(-1, (4, FP4_BLOCK))
    want = (_nearest_even_ref(blocks / s[..., None]) * s[..., None]).flatten(-2)
    assert torch.equal(dequantize_fp4(packed, scale), want)
    assert torch.equal(fake_quant_fp4(x), want)
    assert torch.equal(fake_quant_fp4(x.bfloat16()), fake_quant_fp4(x.bfloat16().float()).bfloat16())
    # dequantized FP4 is exact in bf16 (two significant bits), and what was quantized re-quantizes to itself
    assert torch.equal(dequantize_fp4(packed, scale, out_dtype=torch.bfloat16).float(), want)
    assert torch.equal(fake_quant_fp4(want), want)


def test_scales_follow_the_reference_rule_at_powers_of_two():
    # amax = 6 * 2^k fits scale 2^k exactly; one ulp more needs 2^(k+1)
    x = torch.zeros(2, FP4_BLOCK)
    x[0, 3] = 6.0 * 2.0**-3
    x[1, 3] = torch.nextafter(torch.tensor(6.0 * 2.0**-3), torch.tensor(1.0))
    assert fp4_scales(x).flatten().tolist() == [2.0**-3, 2.0**-2]


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp4(torch.tensor([float("nan")] + [0.0] * 31))
    for bad in (float("nan"), float("inf")):  # a simulation shows NaN for the whole block, never a finite stand-in
        assert torch.isnan(fake_quant_fp4(torch.tensor([bad] + [1.0] * 63))[:32]).all()
        assert torch.isfinite(fake_quant_fp4(torch.tensor([bad] + [1.0] * 63))[32:]).all()
    with pytest.raises(ValueError, match="tile the last dim"):
        quantize_fp4(torch.zeros(3, 40))
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int8 or uint8"):
        unpack_fp4(torch.zeros(3))
    with pytest.raises(ValueError, match="need a scale of shape"):
        dequantize_fp4(torch.zeros(4, 16, dtype=torch.int8), torch.ones(4, 2))
