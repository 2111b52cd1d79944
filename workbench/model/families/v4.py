"""DeepSeek-V4 (Flash, Pro): compressed sparse attention, mHC residual streams, sqrt-softplus MoE in every layer.

Every layer is a `V4Block`: n = hc_mult residual streams mixed by two hyper-connections, a `V4Attention` (a sliding
window of keys, plus compressed entries: CSA at rate 4 with the lightning indexer, HCA at other rates, by
`compress_ratios`) and a MoE with sqrt(softplus) scores (or sigmoid), weights renormalised for every k, SwiGLU
clamped at `swiglu_limit`; the first `num_hash_layers` layers route by the checkpoint's tid2eid table. No dense
layers, no expert groups. The model head collapses the streams (`HyperHead`) before the final norm; the
multi-token-prediction layer is not part of the model.
"""

from __future__ import annotations

from workbench.config import ModelConfig
from workbench.model.moe import MoE
from workbench.model.v4.attention import V4Attention
from workbench.model.v4.block import V4Block
from workbench.probes import ProbeRegistry

SUMMARY = "CSA/HCA sliding-window attention, mHC streams, sqrtsoftplus + hash-routed MoE"


def build_block(config: ModelConfig, layer: int, probes: ProbeRegistry) -> V4Block:
    return V4Block(config, layer, V4Attention(config, layer, probes), MoE(config, layer, probes), probes)
