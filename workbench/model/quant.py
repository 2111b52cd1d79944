"""DeepSeek-V3's FP8 recipe in torch, on any device: the formats and the quantize-dequantize steps blocks share.

Recipe (V3 report §3.3): activations quantized per token in 1x128 tiles, weights in 128x128 blocks, e4m3 codes with
fp32 scales (or power-of-two "ue8m0" scales, V3.1), products accumulated in fp32. The torch path dequantizes both
operands to fp32 and multiplies, so its FP8 error equals the GPU kernel's up to accumulation order. The arithmetic
is `workbench_kernels.reference` (torch only); this module adds the per-site format and the weight caches.

Shape legend: N output features, K input features, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench_kernels.reference import QUANT_BLOCK, act_dequant_ref, act_quant_ref, weight_quant_ref

BLOCK = QUANT_BLOCK  # 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
UE8M0 = torch.float8_e8m0fnu  # DeepSeek-V4's scale dtype: a power of two 2^-127..2^127 stored as its exponent byte

# (weight identity and format) -> (codes, scale_inv); kept per module, rebuilt when the weight changes
QuantCache = tuple[tuple[object, ...], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FP8Format:
    """How a site is quantized: code format (DeepSeek-V3: e4m3 everywhere) and whether scales are powers of two."""

    fmt: str = "e4m3"
    ue8m0: bool = False

    def validate(self) -> FP8Format:
        act_quant_ref(torch.zeros(1, 1), BLOCK, self.fmt)  # raises ValueError naming the known formats
        return self


RUN_FORMAT = FP8Format()  # what a control switches a high-precision site to: DeepSeek-V3's e4m3, fp32 scales


def act_qdq(x: torch.Tensor, f: FP8Format) -> torch.Tensor:
    """Quantize-dequantize activations per token in 1x128 tiles: [..., K] -> fp32 [..., K]."""
    return act_dequant_ref(*act_quant_ref(x, BLOCK, f.fmt, f.ue8m0), BLOCK)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token ||y - ref|| / ||ref|| over the last dim: [..., N] -> [...] fp32."""
    ref = ref.float()
    return (y.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def weight_key(w: torch.Tensor, f: FP8Format) -> tuple[object, ...]:
    """What a cached quantization of `w` depends on: storage, in-place version, device, dtype and format."""
    return (w.data_ptr(), w._version, w.device, w.dtype, f)


def quantize_weight(w: torch.Tensor, f: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (codes [N, K], scale_inv [ceil(N/128), ceil(K/128)] fp32) in 128x128 blocks."""
    return weight_quant_ref(w.detach(), BLOCK, f.fmt, f.ue8m0)


def quantize_stacked(w: torch.Tensor, f: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (codes [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)]): each expert in its own blocks."""
    pairs = [quantize_weight(w[e], f) for e in range(w.shape[0])]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def dequant_stacked(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[E, N, K] codes x [E, ceil(N/128), ceil(K/128)] scales -> fp32 [E, N, K]."""
    _, N, K = q.shape
    return q.float() * s.repeat_interleave(BLOCK, 1)[:, :N].repeat_interleave(BLOCK, 2)[:, :, :K]


def fp32_to_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """fp32 power-of-two scales -> ue8m0, exactly; ValueError when one is not a power of two ue8m0 can hold
    (`.to(float8_e8m0fnu)` alone would round 0.75 to 1.0 without a word)."""
    out = s.to(UE8M0)
    if not torch.equal(out.float(), s.float()):
        bad = s.flatten()[(out.float() != s.float()).flatten()][:4].tolist()
        raise ValueError(f"scales {bad} are not powers of two in ue8m0's range 2^-127..2^127")
    return out
