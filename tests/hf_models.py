"""Tiny random DeepSeek models built with transformers (the implementation we did not write), saved to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, routed_scaling_factor=1.7,
)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.8, "rope_theta": 10000.0}

# (id, model_type, overrides): covers q_lora null/set, softmax/sigmoid, groups on/off, norm_topk_prob on/off,
# YaRN, several dense layers.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("v3-groups-qlora-yarn", "deepseek_v3", dict(n_group=4, topk_group=2, q_lora_rank=24, norm_topk_prob=True,
                                                rope_parameters=YARN)),
    ("v3-nogroups-noqlora-nonorm", "deepseek_v3", dict(n_group=1, topk_group=1, q_lora_rank=None,
                                                      norm_topk_prob=False)),
    ("v3-2dense-halves-rope", "deepseek_v3", dict(n_group=2, topk_group=1, q_lora_rank=24, first_k_dense_replace=2,
                                                 num_hidden_layers=4, rope_interleave=False)),
    ("v2-greedy-noqlora", "deepseek_v2", dict(topk_method="greedy", q_lora_rank=None)),
    ("v2-grouplimited-qlora-yarn", "deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                      q_lora_rank=24, rope_parameters=YARN)),
]


# DeepSeek-V3.2 (the lightning indexer): BASE + YaRN + groups + q-LoRA (the indexer reads the query latent), 16
# index heads (with few heads ReLU zeros make exact ties in the index scores, see tests/model/test_v32.py) of width
# 16 > rope 8, so both the rope and the pass part of the index keys exist; index_topk well below the test lengths.
V32_BASE: dict[str, Any] = dict(n_group=4, topk_group=2, q_lora_rank=24, norm_topk_prob=True, rope_parameters=YARN,
                                index_n_heads=16, index_head_dim=16, index_topk=6)
V32_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("v32-yarn-groups-top6", V32_BASE),
    ("v32-wide-rope-nogroups-top11", dict(V32_BASE, n_group=1, topk_group=1, qk_rope_head_dim=12, qk_nope_head_dim=6,
                                          index_head_dim=24, index_topk=11, rope_parameters=None,
                                          first_k_dense_replace=2, num_hidden_layers=3)),
]


def build_hf(model_type: str, overrides: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    import transformers

    kwargs = {**BASE, **overrides}
    if model_type == "deepseek_v32":
        cfg = transformers.DeepseekV32Config(**kwargs)
        cls = transformers.DeepseekV32ForCausalLM
    elif model_type == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**kwargs)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg = transformers.DeepseekV2Config(**kwargs)
        cls = transformers.DeepseekV2ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Default init (std 0.02) makes near-uniform routing, where top-k ties are decided by rounding noise; larger
    # weights make the choices well separated, so equal choices really test the routing logic.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.bias"):  # V3.2's indexer k_norm (a LayerNorm with bias)
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model


def save_hf(model: torch.nn.Module, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return path
