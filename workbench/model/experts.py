"""Expert MLPs: the SwiGLU `MLP` (dense layers, shared experts) and the stacked routed `Experts`.

Shape legend: T tokens, H hidden, E routed experts, k experts per token, I expert width.

`experts_forward` sorts (token, slot) pairs by expert and runs each expert that was hit on exactly its own rows (as
transformers and vLLM do), or, as the reference, one batched matmul over the experts that were hit with each padded
to the busiest one. `Experts` runs it in high precision or in DeepSeek-V3's FP8 recipe (`fp8`, set by
`workbench.model.fp8.enable_fp8`), on torch or on the fused Triton kernel (`backend`, through
`workbench.model.dispatch`); a run's FP8 controls (`dispatch.fp8_run_sites`) override the module's own state.
DeepSeek-V4 clamps SwiGLU (`swiglu_limit` L, routed and shared experts alike): gate = min(W1 x, L),
up = clamp(W3 x, -L, L), then silu(gate) * up; None (V2/V3) leaves both unclamped.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.model import dispatch
from workbench.model.quant import RUN_FORMAT, FP8Format, QuantCache, act_qdq, dequant_stacked, quantize_stacked, rel_error
from workbench.model.quant import weight_key as _weight_key
from workbench.probes import ProbeSite
from workbench_kernels._runtime import ACT_DTYPES

# How `experts_forward` runs the routed experts: "auto" picks gather (decode-sized) or sorted; the others force one
# (tests compare them).
ExpertsPath = Literal["auto", "loop", "gather", "sorted", "padded"]
PROJS = ("gate_proj", "up_proj", "down_proj")


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up, with V4's clamp when `limit` is set: gate from above only, up from both sides."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, and the shared experts (width n_shared * I); `swiglu_limit`: V4's clamp."""

    def __init__(self, hidden: int, inner: int, swiglu_limit: float | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, swiglu_limit: float | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]; `swiglu_limit`: this run's clamp (None: the module's)."""
        limit = self.swiglu_limit if swiglu_limit is None else swiglu_limit
        if limit is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), limit))


class Experts(nn.Module):
    """E routed experts as stacked weights: gate/up [E, I, H], down [E, H, I]; `swiglu_limit`: V4's clamp.

    Weights kept from an FP8 checkpoint are e4m3 codes with `*_scale_inv` [E, ceil(out/128), ceil(in/128)] block
    scales; simulated FP8 quantizes each expert in 128x128 blocks on first use (cached per weight version).
    """

    def __init__(self, n_experts: int, hidden: int, inner: int, swiglu_limit: float | None = None) -> None:
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))
        self.gate_proj_scale_inv: torch.Tensor | None
        self.up_proj_scale_inv: torch.Tensor | None
        self.down_proj_scale_inv: torch.Tensor | None
        for name in PROJS:
            self.register_buffer(f"{name}_scale_inv", None)  # None (absent from the state dict) unless FP8 is kept
        self.fp8: FP8Format | None = None
        self.backend: dispatch.Backend = "auto"
        self.hook_fp8_rel_error: ProbeSite | None = None  # [T], set with `fp8`
        self._fp8_cache: dict[str, QuantCache] = {}

    # ------------------------------------------------------------------ weights
    def quantized_weights(self, fmt: FP8Format | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(codes [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)])] for gate, up, down: the stored ones of an
        FP8 checkpoint, or each expert quantized in `fmt` (default: the module's) and cached."""
        f = fmt if fmt is not None else self.fp8
        if f is None:
            raise ValueError("quantized_weights: these experts are not in FP8 and no format was given")
        out = []
        for name in PROJS:
            w: torch.Tensor = getattr(self, name)
            stored = getattr(self, f"{name}_scale_inv")
            if stored is not None:
                out.append((w, stored))
                continue
            key = _weight_key(w, f)
            cached = self._fp8_cache.get(name)
            if cached is None or cached[0] != key:
                cached = (key, *quantize_stacked(w, f))
                self._fp8_cache[name] = cached
            out.append((cached[1], cached[2]))
        return out

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The high-precision weights [E, ...]: the Parameters, or an FP8 checkpoint's dequantized to fp32."""
        if self.gate_proj_scale_inv is None:
            return self.gate_proj, self.up_proj, self.down_proj
        g, u, d = (dequant_stacked(q, s) for q, s in self.quantized_weights())
        return g, u, d

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                swiglu_limit: float | None = None) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> [T, H]; `swiglu_limit`: this run's clamp (None: the module's)."""
        limit = self.swiglu_limit if swiglu_limit is None else swiglu_limit
        run = dispatch.fp8_run_sites()  # a run's FP8 controls for this layer, if any
        if run is not None and ("experts" in run) != (self.fp8 is not None):
            if "experts" in run:  # switched to FP8 for this run only: the torch recipe, no probe
                return self._forward_fp8(x, ids, weights, RUN_FORMAT, "torch", None, limit)
            return experts_forward(x, ids, weights, *self.dense_weights(), swiglu_limit=limit)
        if self.fp8 is not None:
            return self._forward_fp8(x, ids, weights, self.fp8, self.backend, self.hook_fp8_rel_error, limit)
        # the fused_moe kernel has no SwiGLU clamp: V4's clamped experts run in torch (an explicit "triton" raises)
        ok = x.dtype in ACT_DTYPES and limit is None
        why = f"fused_moe takes fp32/bf16/fp16 activations and no swiglu_limit (got {x.dtype}, {limit})"
        if dispatch.use_triton(self.backend, x.device, "experts", ok, why):
            return dispatch.launcher("fused_moe").fused_moe(x, self.gate_proj, self.up_proj, self.down_proj, ids,
                                                            weights)
        return experts_forward(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj,
                               swiglu_limit=limit)

    def _forward_fp8(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, f: FP8Format,
                     backend: str, site: ProbeSite | None, limit: float | None) -> torch.Tensor:
        # the fused_moe kernel has no SwiGLU clamp: V4's clamped experts run in torch (an explicit "triton" raises)
        fused_ok = f.fmt == "e4m3" and not f.ue8m0 and x.dtype in ACT_DTYPES and limit is None
        why = (f"fused_moe takes fp32/bf16/fp16 activations, FP8 only as e4m3 with fp32 scales and no swiglu_limit "
               f"(got {x.dtype}, {f}, {limit})")
        (qg, sg), (qu, su), (qd, sd) = self.quantized_weights(f)
        if dispatch.use_triton(backend, x.device, "experts", fused_ok, why):
            y = dispatch.launcher("fused_moe").fused_moe(x, qg, qu, qd, ids, weights, w_gate_scale=sg,
                                                         w_up_scale=su, w_down_scale=sd)
        else:
            y = experts_forward(x, ids, weights, dequant_stacked(qg, sg), dequant_stacked(qu, su),
                                dequant_stacked(qd, sd), act_qdq=partial(act_qdq, f=f), swiglu_limit=limit)
        if site is not None and site.listened():
            wg, wu, wd = (w.to(x.dtype) for w in self.dense_weights())
            site(rel_error(y, experts_forward(x, ids, weights, wg, wu, wd, swiglu_limit=limit)))  # [T]
        return y


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                    w_up: torch.Tensor, w_down: torch.Tensor,
                    act_qdq: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    path: ExpertsPath = "auto", swiglu_limit: float | None = None) -> torch.Tensor:
    """x [T, H], ids/weights [T, k] -> sum_k weights * expert_k(x)  [T, H].

    `path` "loop" (what "auto" takes for few (token, slot) pairs, i.e. decoding): three matmuls per pair on views of
    the chosen experts' weights, nothing copied (on a 2-core CPU 1.4-3x faster than "gather" at T = 1, more on larger
    experts). "gather": gather the chosen experts' weights per slot, one batched matmul. "sorted" (prefill): sort the
    pairs by expert and run each expert hit on its own rows, three matmuls per expert. "padded" (the reference for
    "sorted"): sort, pad each expert's rows to the busiest expert's count, one bmm per projection; routing is rarely
    balanced (the bundled model's busiest expert gets 2.6x the mean), so padding costs about that factor in matmul
    work. `F.grouped_mm` would run "sorted" in one call, but its CPU backward
    fails (torch 2.13) and the forward must not depend on whether autograd is on.
    `act_qdq` (FP8 simulation; weights then are dequantized fp32) quantize-dequantizes the input and the SwiGLU
    output, the latter first rounded to x's dtype, as DeepSeek's FP8 MoE does; the result is in x's dtype.
    `swiglu_limit` (V4) clamps gate and up before the SwiGLU product (`swiglu`).
    """
    dtype = x.dtype
    T, H = x.shape
    k = ids.shape[1]
    if act_qdq is not None:
        x = act_qdq(x)  # [T, H] fp32

    def act(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = F.silu(g) * u if swiglu_limit is None else swiglu(g, u, swiglu_limit)
        return h if act_qdq is None else act_qdq(h.to(dtype))

    if path == "auto":
        path = "loop" if T * k <= w_gate.shape[0] else "sorted"
    if path == "loop":
        outs = []
        for t, row in enumerate(ids.tolist()):
            xt = x[t : t + 1]  # [1, H]
            for e in row:
                outs.append(F.linear(act(F.linear(xt, w_gate[e]), F.linear(xt, w_up[e])), w_down[e]))  # [1, H]
        out = torch.cat(outs).view(T, k, H)  # [T, k, H]
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(dtype)
    if path == "gather":
        xs = x[:, None, :, None]  # [T, 1, H, 1]
        g = (w_gate[ids] @ xs)[..., 0]  # [T, k, I]
        u = (w_up[ids] @ xs)[..., 0]  # [T, k, I]
        out = (w_down[ids] @ act(g, u)[..., None])[..., 0]  # [T, k, H]
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(dtype)
    flat_ids = ids.reshape(-1)  # [T*k]
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // k  # [T*k] token of each sorted pair
    pair_weights = weights.reshape(-1)[order, None]  # [T*k, 1]
    if path == "sorted":
        rows_per_expert = torch.bincount(flat_ids, minlength=w_gate.shape[0]).tolist()  # [E], in sorted order
        xs = x.index_select(0, token_of)  # [T*k, H]
        outs = []
        first = 0
        for e, n in enumerate(rows_per_expert):
            if n:
                xe = xs[first : first + n]  # [n, H] this expert's rows
                outs.append(F.linear(act(F.linear(xe, w_gate[e]), F.linear(xe, w_up[e])), w_down[e]))  # [n, H]
                first += n
        out = torch.cat(outs)  # [T*k, H]
        return x.new_zeros(T, H).index_add_(0, token_of, out * pair_weights.to(out.dtype)).to(dtype)
    if path != "padded":
        raise ValueError(f"experts path must be one of 'auto', 'gather', 'sorted', 'padded', got {path!r}")
    sorted_ids = flat_ids[order]
    active, counts = sorted_ids.unique_consecutive(return_counts=True)  # experts that received tokens
    starts = counts.cumsum(0) - counts
    slot_of_active = torch.repeat_interleave(torch.arange(len(active), device=x.device), counts)  # [T*k]
    row = torch.arange(T * k, device=x.device) - starts[slot_of_active]  # position within its expert
    capacity = int(counts.max())
    buf = x.new_zeros(len(active), capacity, H)  # [A, cap, H], A = experts hit
    buf[slot_of_active, row] = x[token_of]
    g = torch.bmm(buf, w_gate[active].transpose(1, 2))  # [A, cap, I]
    u = torch.bmm(buf, w_up[active].transpose(1, 2))  # [A, cap, I]
    out = torch.bmm(act(g, u), w_down[active].transpose(1, 2))  # [A, cap, H]
    contrib = out[slot_of_active, row] * pair_weights.to(out.dtype)  # [T*k, H]
    return x.new_zeros(T, H).index_add_(0, token_of, contrib).to(dtype)
