"""`set_backend`: route kinds of module in chosen layers of a model to "torch", "triton" or "auto".

The kinds and what "auto" means are `workbench.model.dispatch`'s (the module every block asks at run time):
"gate" (MoE router -> `moe_gate`), "experts" (routed experts -> `fused_moe`), "fp8_linear" (`FP8Linear`s ->
`act_quant` + `fp8_gemm`), "attn_decode" (absorbed-MLA decode steps -> `mla_decode`). Asking for "triton" where
Triton cannot run raises `KernelUnavailableError` saying why (not installed, or no CUDA device and no
`TRITON_INTERPRET=1`), before any module changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from workbench.model.block import Block
from workbench.model.dispatch import BACKENDS, KINDS, Backend, require_triton
from workbench.model.fp8 import resolve_layers
from workbench.model.fp8_linear import FP8Linear
from workbench.model.moe import MoE

if TYPE_CHECKING:
    from workbench.model.transformer import DeepSeekModel

__all__ = ["set_backend"]


def set_backend(model: DeepSeekModel, backend: Backend, *, modules: Iterable[str] | str | None = None,
                layers: Iterable[int] | int | None = None) -> list[str]:
    """Route the chosen kinds of module (default: all of `dispatch.KINDS`) in the chosen layers (default: all) to
    `backend`. Returns the modules set. FP8 linears take the backend they are given here, so call it after
    `enable_fp8`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    kinds = set(KINDS if modules is None else [modules] if isinstance(modules, str) else modules)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown module kinds {sorted(unknown)}; known: {list(KINDS)}")
    if backend == "triton":
        require_triton(next(model.parameters()).device)
    done = []
    for L in resolve_layers(model, layers):
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
