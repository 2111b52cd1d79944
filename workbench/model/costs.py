"""Cost maths shared by widgets, benchmarks and docs: KV-cache bytes, parameter counts, FLOPs per token.

Computed from the config alone, so it works for V3-sized shapes that are never instantiated.
"""

from __future__ import annotations

from workbench.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, gqa_groups: int | None = None) -> dict[str, float]:
    """Bytes cached per token over all layers: MLA's latent vs the MHA / GQA caches of the same attention shape.

    MLA caches c_kv (C) + the shared rope key (R) per layer. MHA caches per head a key of qk_head_dim and a value of
    v_head_dim. GQA shares each key/value head among nH / groups query heads (`gqa_groups`, default the config's
    num_key_value_heads when it is smaller than nH, else 8, or nH / 2 for small models).
    """
    L, nH = config.num_hidden_layers, config.num_attention_heads
    mla_elements = config.kv_lora_rank + config.qk_rope_head_dim
    per_head = config.qk_head_dim + config.v_head_dim
    if gqa_groups is None:
        kvh = config.num_key_value_heads
        gqa_groups = kvh if kvh is not None and kvh < nH else (8 if nH > 8 else max(1, nH // 2))
    return {
        "mla": float(L * mla_elements * dtype_bytes),
        "mha": float(L * nH * per_head * dtype_bytes),
        "gqa": float(L * gqa_groups * per_head * dtype_bytes),
        "gqa_groups": float(gqa_groups),
        "mla_elements_per_layer": float(mla_elements),
        # GQA groups whose cache equals MLA's, per-head key/value width d_h = v_head_dim as in DeepSeek-V2's
        # Table 1 (it reports 2.25 for d_c = 4 d_h, d_h^R = d_h / 2)
        "mla_equivalent_gqa_groups": mla_elements / (2 * config.v_head_dim),
    }


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameters of the main model (MTP modules excluded)."""
    H, nH, C, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    qk, V, I = config.qk_head_dim, config.v_head_dim, config.moe_intermediate_size
    if config.q_lora_rank is None:
        q = H * nH * qk
    else:
        q = H * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * nH * qk
    attn = q + H * (C + R) + C + C * nH * (config.qk_nope_head_dim + V) + nH * V * H
    total = active = 0
    for layer in range(config.num_hidden_layers):
        common = attn + 2 * H
        if config.is_moe_layer(layer):
            shared = 3 * H * I * config.n_shared_experts
            gate = config.n_routed_experts * H
            total += common + gate + shared + 3 * H * I * config.n_routed_experts
            active += common + gate + shared + 3 * H * I * config.num_experts_per_tok
        else:
            total += common + 3 * H * config.intermediate_size
            active += common + 3 * H * config.intermediate_size
    embed = config.vocab_size * H
    head = 0 if config.tie_word_embeddings else config.vocab_size * H
    return {"total": total + embed + head + H, "active": active + embed + head + H,
            "embedding": embed, "lm_head": head}


def estimate_flops(config: ModelConfig, context: int = 1) -> dict[str, float]:
    """Forward FLOPs per token at a given context length (2 per multiply-add; embedding lookup is free)."""
    counts = parameter_counts(config)
    matmul_params = counts["active"] - counts["embedding"]
    nH, L = config.num_attention_heads, config.num_hidden_layers
    attention = 2.0 * L * nH * (config.qk_head_dim + config.v_head_dim) * context
    return {"matmul": 2.0 * matmul_params, "attention": attention, "total": 2.0 * matmul_params + attention,
            "params_active": float(counts["active"]), "params_total": float(counts["total"])}
