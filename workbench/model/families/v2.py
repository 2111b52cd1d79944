"""DeepSeek-V2 (and V2-Lite): MLA attention; DeepSeekMoE with softmax scores and group-limited greedy routing.

Every layer is an MLA attention and either a dense SwiGLU MLP (the first `first_k_dense_replace` layers, and those
off `moe_layer_freq`) or a MoE (routed experts + shared experts). V2 routes by softmax with no balancing bias;
`norm_topk_prob` is honoured as DeepSeek's MoEGate does (transformers' V2 ignores it; every published V2 config
sets it false).
"""

from __future__ import annotations

from workbench.config import ModelConfig
from workbench.model.block import Block
from workbench.model.experts import MLP
from workbench.model.mla import MLA
from workbench.model.moe import MoE
from workbench.probes import ProbeRegistry

SUMMARY = "MLA + DeepSeekMoE, softmax gate, group_limited_greedy"


def build_block(config: ModelConfig, layer: int, probes: ProbeRegistry) -> Block:
    mlp: MoE | MLP = (MoE(config, layer, probes) if config.is_moe_layer(layer)
                      else MLP(config.hidden_size, config.intermediate_size))
    return Block(config, layer, MLA(config, layer, probes), mlp, probes)
