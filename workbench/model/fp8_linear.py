"""`FP8Linear`: a linear in DeepSeek-V3's FP8 recipe, the block that `workbench.model.fp8.enable_fp8` swaps in.

It holds either the *same* Parameter as the `nn.Linear` it replaced (quantized on first use, cached per weight
version; state-dict names unchanged, nothing copied) or, from an FP8 checkpoint, e4m3 codes with their
`weight_scale_inv` [ceil(N/128), ceil(K/128)] under DeepSeek's names. The torch backend runs `act_quant_ref` +
`fp8_gemm_ref`; the triton backend `act_quant` + `fp8_gemm` (chosen through `workbench.model.dispatch`).
While someone listens, the probe `hook_fp8_rel_error` gets the per-token relative error against high precision.

Shape legend: N output features, K input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.model import dispatch
from workbench.model.quant import BLOCK, FP8Format, QuantCache, is_fp8, quantize_weight, rel_error, weight_key
from workbench.probes import ProbeSite
from workbench_kernels.reference import act_quant_ref, fp8_gemm_ref, weight_dequant_ref


class FP8Linear(nn.Module):
    """A linear in DeepSeek-V3's FP8 recipe (see the module docstring)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_scale_inv: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: FP8Format,
                 weight_scale_inv: torch.Tensor | None = None) -> None:
        super().__init__()
        if is_fp8(weight) != (weight_scale_inv is not None):
            raise ValueError("FP8 weights need their weight_scale_inv, and only FP8 weights take one")
        self.out_features, self.in_features = weight.shape
        self.fmt = fmt
        self.backend: dispatch.Backend = "auto"
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias))
        self.register_buffer("weight_scale_inv", weight_scale_inv)
        self.hook_fp8_rel_error: ProbeSite | None = None
        self.site = ""  # which of fp8.SITES this linear is (set by enable_fp8 / install_fp8_weights), for run controls
        self._cache: QuantCache | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: FP8Format) -> FP8Linear:
        return cls(linear.weight, linear.bias, fmt)  # the same Parameters: nothing copied

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The plain linear back: the same Parameter, or FP8 weights dequantized to `dtype`."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight if self.weight_scale_inv is None else nn.Parameter(self.dense_weight(dtype))
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K], scale_inv [ceil(N/128), ceil(K/128)] fp32): stored ones, or the cached quantization."""
        if self.weight_scale_inv is not None:
            return self.weight, self.weight_scale_inv
        key = weight_key(self.weight, self.fmt)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *quantize_weight(self.weight, self.fmt))
        return self._cache[1], self._cache[2]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the FP8 GEMM effectively multiplies by, [N, K]; absorbed-MLA einsums use it directly."""
        return weight_dequant_ref(*self.quantized_weight(), BLOCK, out_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = dispatch.fp8_run_sites()
        if run is not None and self.site not in run:  # a run's controls switched this site to high precision
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(torch.float32).to(x.dtype)
            return F.linear(x, w, self.bias)
        q, s = self.quantized_weight()
        if dispatch.use_triton(self.backend, x.device, "fp8_linear"):
            kernels_quant, kernels_gemm = dispatch.launcher("fp8_quant"), dispatch.launcher("fp8_gemm")
            xq, xs = kernels_quant.act_quant(x, BLOCK, self.fmt.fmt, self.fmt.ue8m0)  # [..., K], [..., ceil(K/128)]
            y = kernels_gemm.fp8_gemm(xq, xs, q, s, out_dtype=x.dtype)  # [..., N]
        else:
            xq, xs = act_quant_ref(x, BLOCK, self.fmt.fmt, self.fmt.ue8m0)
            y = fp8_gemm_ref(xq, xs, q, s, out_dtype=x.dtype)  # [..., N]
        if self.bias is not None:
            y = y + self.bias
        site = self.hook_fp8_rel_error
        if site is not None and site.listened():
            w = self.weight if self.weight_scale_inv is None else self.dense_weight(x.dtype)
            site(rel_error(y, F.linear(x, w, self.bias)))  # [B, S] or [T]
        return y

    def extra_repr(self) -> str:
        kept = ", fp8 weights" if self.weight_scale_inv is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.fmt}, "
                f"ue8m0={self.fmt.ue8m0}, backend={self.backend}{kept}")
