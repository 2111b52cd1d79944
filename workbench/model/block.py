"""The decoder layer with a plain residual stream: x + attn(norm(x)), then + mlp(norm(x)) (DeepSeek V2/V3).

Shape legend: B batch, S new tokens, H hidden.
A family (`workbench.model.families`) builds each layer's attention and MLP and hands them to `Block`; the block
applies a layer's interventions (`LayerControls`), which arrive as an explicit argument, not as state on modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model import dispatch
from workbench.model.cache import LatentKVCache
from workbench.model.experts import MLP
from workbench.model.mla import MLA, AttnMode
from workbench.model.moe import MoE
from workbench.model.norm import RMSNorm
from workbench.model.rope import Rotary
from workbench.model.routing import RouteOverride
from workbench.probes import ProbeRegistry


@dataclass(frozen=True, eq=False)
class LayerControls:
    """What one layer is told to do differently; None fields leave that part of the layer alone."""

    routing: RouteOverride | None = None  # MoE layers only
    latent_basis: torch.Tensor | None = None  # [C, r] orthonormal columns: c_kv is projected onto their span
    fp8_sites: frozenset[str] | None = None  # exactly these sites compute in FP8 in this layer (None: as the model is)
    # sparse attention (V3.2's indexed MLA, V4's attention): None / True leave the layer as it is
    index_topk: int | None = None  # keys (V3.2) or compressed entries (V4 CSA) the indexer keeps per query
    dense_attention: bool = False  # no indexer choice: V3.2 every causal key, V4 every visible compressed entry
    sliding_window: int | None = None  # V4: window keys per query, self included (at most the config's)
    use_window: bool = True  # V4: False drops the sliding-window keys
    use_compressed: bool = True  # V4 CSA/HCA: False drops the compressed entries (and skips the compressors)
    # V4 residual and MoE
    mhc_identity: bool = False  # V4: both hyper-connections mix with M = I (X' = post (x) y + X)
    hash_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # V4 hash layer: token ids [r], their experts [r, k]
    swiglu_limit: float | None = None  # V4: the SwiGLU clamp of routed and shared experts (None: the config's)


class ResolvableControls(Protocol):
    """What `DeepSeekModel.forward(controls=...)` takes besides {layer: LayerControls}: `workbench.Controls`, which
    resolves itself against the model's config (the model cannot import the controls package, which imports it)."""

    def resolve(self, config: ModelConfig, *, svd_bases: Mapping[int, torch.Tensor] | None = None,
                dtype: torch.dtype = ..., device: torch.device | str = ...,
                checkpoint: str | None = ...) -> dict[int, LayerControls]: ...


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: MLA, mlp: MoE | MLP, probes: ProbeRegistry) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp
        self.hook_resid_pre = probes.site(f"blocks.{layer}.hook_resid_pre")  # [B, S, H]
        self.hook_resid_mid = probes.site(f"blocks.{layer}.hook_resid_mid")  # [B, S, H]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                cache: LatentKVCache | None, mode: AttnMode, controls: LayerControls | None = None) -> torch.Tensor:
        if controls is not None and controls.fp8_sites is not None:
            with dispatch.run_fp8_sites(controls.fp8_sites):  # this thread only: the shared modules stay as they are
                return self._forward(x, cos, sin, rotary, cache, mode, controls)
        return self._forward(x, cos, sin, rotary, cache, mode, controls)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                 cache: LatentKVCache | None, mode: AttnMode, controls: LayerControls | None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        basis = controls.latent_basis if controls is not None else None
        topk = controls.index_topk if controls is not None else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rotary, cache, mode, basis, index_topk=topk)
        x = self.hook_resid_mid(x)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, controls.routing if controls is not None else None)
        return x + self.mlp(h)
