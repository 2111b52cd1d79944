"""The names a config is made of: model types, V4's attention kinds, and the error a bad config raises.

Kept apart from `ModelConfig` so that the config.json forms (`v4_forms`) and the dataclass share them without
importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

ScoringFunc = Literal["softmax", "sigmoid", "sqrtsoftplus"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
RopeLayout = Literal["rope_parameters", "rope_scaling"]

ModelType = Literal["deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4"]
ConfigForm = Literal["hf", "hub"]  # V4 only: transformers' layer_types/compress_rates, or DeepSeek's compress_ratios

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM"}
# V4's attention kinds, by transformers' layer_types names; DeepSeek's code tells them apart by compress ratio
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
KIND_NAMES = {SLIDING: "window", CSA: "CSA", HCA: "HCA"}  # the short names the views and reports print
CSA_RATIO = 4  # DeepSeek's inference code: ratio 4 = CSA (overlapping windows + indexer), any other > 0 = HCA


class ConfigError(ValueError):
    """A configuration that no DeepSeek model could have; the message names the offending field."""


INDEX_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")  # the lightning indexer's config.json keys


def rope_type(rope_scaling: Mapping[str, Any]) -> str:
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(s) + 1 (1 when not extrapolating)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
