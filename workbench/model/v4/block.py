"""The DeepSeek-V4 decoder layer: attention and MoE, each between two mHC hyper-connections.

Shape legend: B batch, S new tokens, n streams (hc_mult), D hidden.

The residual state is n streams X [B, S, n, D] (`workbench.model.v4.hyper`). Per sublayer F:
u = sum_i pre_i X_i -> RMSNorm -> F -> y, then X' = post (x) y + M^T X. The attention is `V4Attention` (sliding
window, CSA or HCA by the layer's compress ratio), the MLP V4's `MoE` (hash-routed in the first num_hash_layers
layers, so the block takes the token ids). The family (`workbench.model.families.v4`) builds both and hands them in.
Interventions arrive as `LayerControls`: routing overrides and per-run FP8 sites as in V2/V3; the attention's
budget, window and branches, identity mHC mixing, tid2eid edits and the SwiGLU limit; V4 has no MLA latent, so a
latent-basis control raises.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model import dispatch
from workbench.model.block import LayerControls
from workbench.model.moe import MoE
from workbench.model.norm import RMSNorm
from workbench.model.v4.attention import V4Attention, V4AttnMode
from workbench.model.v4.cache import V4LayerCache
from workbench.model.v4.hyper import HyperConnection, expand
from workbench.probes import ProbeRegistry


class V4Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: V4Attention, mlp: MoE,
                 probes: ProbeRegistry) -> None:
        super().__init__()
        self.layer = layer
        self.attn_hc = HyperConnection(config, probes, f"blocks.{layer}.hc_attn")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.ffn_hc = HyperConnection(config, probes, f"blocks.{layer}.hc_ffn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp
        self.hook_resid_pre = probes.site(f"blocks.{layer}.hook_resid_pre")  # [B, S, n, D] the streams coming in
        self.hook_resid_mid = probes.site(f"blocks.{layer}.hook_resid_mid")  # [B, S, n, D] after attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V4LayerCache | None, mode: V4AttnMode,
                controls: LayerControls | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, n, D] streams, positions [S], input_ids [B, S] (hash layers need them) -> [B, S, n, D]."""
        if controls is not None and controls.latent_basis is not None:
            raise ValueError(f"layer {self.layer}: a latent control projects MLA's c_kv; DeepSeek-V4 attention "
                             "has no MLA latent")
        if controls is not None and controls.fp8_sites is not None:
            with dispatch.run_fp8_sites(controls.fp8_sites):  # this thread only: the shared modules stay as they are
                return self._forward(x, positions, cache, mode, controls, input_ids)
        return self._forward(x, positions, cache, mode, controls, input_ids)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V4LayerCache | None, mode: V4AttnMode,
                 controls: LayerControls | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        c = controls if controls is not None else _NONE
        x = self.hook_resid_pre(x)
        u, post, mix = self.attn_hc(x)  # [B, S, D], [B, S, n], [B, S, n, n]
        y = self.self_attn(self.input_layernorm(u), positions, cache, mode, index_topk=c.index_topk,
                           dense=c.dense_attention, window=c.sliding_window, use_window=c.use_window,
                           use_compressed=c.use_compressed)  # [B, S, D]
        x = self.hook_resid_mid(expand(x, y, post, _identity(mix) if c.mhc_identity else mix))
        u, post, mix = self.ffn_hc(x)
        y = self.mlp(self.post_attention_layernorm(u), c.routing, input_ids, hash_rows=c.hash_rows,
                     swiglu_limit=c.swiglu_limit)  # [B, S, D]
        return expand(x, y, post, _identity(mix) if c.mhc_identity else mix)


_NONE = LayerControls()  # a layer without controls


def _identity(mix: torch.Tensor) -> torch.Tensor:
    """The identity in place of the Sinkhorn matrices [B, S, n, n] (a control: the streams pass through unmixed)."""
    return torch.eye(mix.shape[-1], dtype=mix.dtype, device=mix.device).expand_as(mix)
