"""DeepSeek-V3.2 (V3.2-Exp): V3's layers with DeepSeek Sparse Attention, a lightning indexer in every attention.

The indexer (`workbench.model.indexer`) scores all past tokens for each query from MLA's query latent and a
LayerNorm'd key of its own, and MLA attends only to the `index_topk` best; "the only architectural modification"
of V3.2 (DeepSeek's report, §1). Everything else is V3: MLA projections, YaRN, sigmoid `noaux_tc` routing, the
dense first layers. The cache keeps the indexer's keys beside the latents. Parameter names are transformers'
(`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`), so checkpoints load through the same name table.
"""

from __future__ import annotations

from workbench.config import ModelConfig
from workbench.model.block import Block
from workbench.model.experts import MLP
from workbench.model.indexer import LightningIndexer
from workbench.model.mla import MLA
from workbench.model.moe import MoE
from workbench.probes import ProbeRegistry

SUMMARY = "V3's layers; MLA masked to the index_topk tokens a lightning indexer picks per query (DSA)"


def build_block(config: ModelConfig, layer: int, probes: ProbeRegistry) -> Block:
    mlp: MoE | MLP = (MoE(config, layer, probes) if config.is_moe_layer(layer)
                      else MLP(config.hidden_size, config.intermediate_size))
    attention = MLA(config, layer, probes, indexer=LightningIndexer(config, layer, probes))
    return Block(config, layer, attention, mlp, probes)
