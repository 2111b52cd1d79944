"""Which implementation runs a module: `torch` (the reference) or `triton` (the kernels of `workbench_kernels`).

Every module starts at "auto": the Triton kernel on CUDA where it supports the case, torch elsewhere (so the CPU
default is the reference). `set_backend(model, "triton", modules=..., layers=...)` is explicit and never falls
back: where Triton cannot run here (no CUDA device, and no TRITON_INTERPRET=1 set before `workbench_kernels` was
imported) it raises `KernelUnavailableError`, and an unsupported dtype or FP8 format raises `ValueError` at the call.

Module kinds:
- "gate": the MoE router (scores, bias, group-limited top-k, weights) -> `moe_gate`.
- "experts": routed experts -> `fused_moe` (weights in the activation dtype, or FP8 e4m3 with fp32 scales).
- "fp8_linear": `FP8Linear`s (see `workbench.model.fp8`) -> `act_quant` + `fp8_gemm`.
- "attn_decode": absorbed-MLA decode steps (S == 1 with a cache, mode="absorb") -> `mla_decode`.
The MoE gate kernel runs through `route_triton`, a drop-in for `moe.route` that `MoE.forward` calls when the gate's
backend resolves to triton and no routing control is active (controls use the torch `route`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Literal, cast

import torch

from workbench.model.fp8 import (
    FP8Linear,
    _dequant_stacked,
    _resolve_layers,
    act_qdq,
    expert_weights_fp8,
    experts_dense_weights,
    rel_error,
)
from workbench.model.moe import Experts, MoE, RoutingParams, experts_forward
from workbench_kernels import fp8_quant
from workbench_kernels._runtime import ACT_DTYPES, KernelUnavailableError, check_launchable
from workbench_kernels.fused_moe import fused_moe
from workbench_kernels.mla_decode import mla_decode
from workbench_kernels.moe_gate import moe_gate

if TYPE_CHECKING:
    from workbench.model.transformer import Block, DeepSeekModel

Backend = Literal["auto", "torch", "triton"]
KINDS = ("gate", "experts", "fp8_linear", "attn_decode")

__all__ = ["KINDS", "KernelUnavailableError", "require_triton", "resolve_backend", "route_triton", "set_backend"]


def require_triton(device: torch.device | str) -> None:
    """Raise `KernelUnavailableError` (saying why) unless Triton kernels can run on `device` in this process."""
    check_launchable(fp8_quant.act_quant_kernel, torch.empty(0, device=device))


def resolve_backend(backend: str, device: torch.device, kind: str, supported: bool = True, why: str = "") -> str:
    """"torch" or "triton" for one call: "auto" picks triton on CUDA when `supported`; explicit "triton" on an
    unsupported case raises ValueError with `why`."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not supported:
            raise ValueError(f"triton backend for {kind}: {why}; use the torch backend for this module")
        return "triton"
    if backend == "auto":
        return "triton" if device.type == "cuda" and supported else "torch"
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def set_backend(model: DeepSeekModel, backend: Backend, *, modules: Iterable[str] | str | None = None,
                layers: Iterable[int] | int | None = None) -> list[str]:
    """Route the chosen kinds of module (default: all) in the chosen layers (default: all) to `backend`.

    Returns the modules set. FP8 linears take the backend they are given here, so call it after `enable_fp8`.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    kinds = set(KINDS if modules is None else [modules] if isinstance(modules, str) else modules)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown module kinds {sorted(unknown)}; known: {list(KINDS)}")
    if backend == "triton":
        require_triton(next(model.parameters()).device)
    done = []
    for L in _resolve_layers(model, layers):
        block = cast("Block", model.layers[L])
        if "attn_decode" in kinds:
            block.self_attn.backend = backend
            done.append(f"blocks.{L}.attn")
        if "gate" in kinds and isinstance(block.mlp, MoE):
            block.mlp.gate.backend = backend
            done.append(f"blocks.{L}.mlp.gate")
        if "experts" in kinds and isinstance(block.mlp, MoE):
            block.mlp.experts.backend = backend
            done.append(f"blocks.{L}.mlp.experts")
        if "fp8_linear" in kinds:
            for name, m in block.named_modules():
                if isinstance(m, FP8Linear):
                    m.backend = backend
                    done.append(f"blocks.{L}.{name.replace('self_attn.', 'attn.')}")
    return done


# ---------------------------------------------------------------------------------------------- experts
def run_experts(experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`Experts.forward` when FP8 or a non-torch backend is on: x [T, H], ids/weights [T, k] -> [T, H]."""
    f = experts.fp8
    fused_ok = f is None or (f.fmt == "e4m3" and not f.ue8m0)
    backend = resolve_backend(experts.backend, x.device, "experts", fused_ok and x.dtype in ACT_DTYPES,
                              "fused_moe takes fp32/bf16/fp16 activations and FP8 only as e4m3 with fp32 scales "
                              f"(got {x.dtype}, {f})")
    if f is None:
        if backend == "triton":
            return fused_moe(x, experts.gate_proj, experts.up_proj, experts.down_proj, ids, weights)
        return experts_forward(x, ids, weights, experts.gate_proj, experts.up_proj, experts.down_proj)
    (qg, sg), (qu, su), (qd, sd) = expert_weights_fp8(experts)
    if backend == "triton":
        y = fused_moe(x, qg, qu, qd, ids, weights, w_gate_scale=sg, w_up_scale=su, w_down_scale=sd)
    else:
        y = experts_forward(x, ids, weights, _dequant_stacked(qg, sg), _dequant_stacked(qu, su),
                            _dequant_stacked(qd, sd), act_qdq=partial(act_qdq, f=f))
    site = experts.hook_fp8_rel_error
    if site is not None and site.listened():
        wg, wu, wd = (w.to(x.dtype) for w in experts_dense_weights(experts))
        site(rel_error(y, experts_forward(x, ids, weights, wg, wu, wd)))  # [T]
    return y


# ---------------------------------------------------------------------------------------------- gate
def route_triton(logits: torch.Tensor, bias: torch.Tensor | None,
                 p: RoutingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe.route` on the `moe_gate` kernel: logits [T, E] -> (scores [T, E] fp32, ids [T, k], weights [T, k]).

    The scores (for the router-score probe) are recomputed in torch; selection and weights come from the kernel.
    """
    method = p.topk_method if p.n_group > 1 and p.topk_method in ("group_limited_greedy", "noaux_tc") else "greedy"
    ids, weights, _ = moe_gate(logits, bias, top_k=p.top_k, n_group=p.n_group, topk_group=p.topk_group,
                               scoring_func=p.scoring_func,  # type: ignore[arg-type]
                               topk_method=method,  # type: ignore[arg-type]
                               norm_topk_prob=p.norm_topk_prob and p.top_k > 1,
                               routed_scaling_factor=p.routed_scaling_factor)
    lf = logits.float()
    scores = lf.softmax(dim=-1) if p.scoring_func == "softmax" else lf.sigmoid()  # [T, E]
    return scores, ids, weights


# ---------------------------------------------------------------------------------------------- MLA decode
def mla_decode_step(backend: str, q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                    k_pe: torch.Tensor, softmax_scale: float) -> torch.Tensor | None:
    """One absorbed decode step on the kernel: q_latent [B, 1, nH, C], q_pe [B, 1, nH, R], the whole cached
    history c_kv [B, T, C], k_pe [B, T, R] -> o_latent [B, 1, nH, C] (a single new token sees all T rows);
    None when "auto" resolves to torch, for the caller's own attention."""
    dtypes = {q_latent.dtype, q_pe.dtype, c_kv.dtype, k_pe.dtype}
    supported = len(dtypes) == 1 and dtypes <= set(ACT_DTYPES)
    why = f"mla_decode needs one fp32/bf16/fp16 dtype for query and cache, got {sorted(map(str, dtypes))}"
    if resolve_backend(backend, c_kv.device, "attn_decode", supported, why) == "torch":
        return None
    B, T = c_kv.shape[:2]
    lengths = torch.full((B,), T, dtype=torch.int32, device=c_kv.device)
    out = mla_decode(q_latent[:, 0].contiguous(), q_pe[:, 0].contiguous(), c_kv, k_pe, lengths, softmax_scale)
    assert isinstance(out, torch.Tensor)
    return out[:, None]  # [B, 1, nH, C]
