"""Cost maths shared by widgets, benchmarks and docs: parameter counts, KV-cache bytes, FLOPs per token.

Computed from the config alone, so it works for shapes that are never instantiated (V3's 671B, V4-Pro's 1.6T).

Shape legend: L layers, D hidden, V vocab, E routed experts, k experts per token, I expert width,
nH query heads, C kv_lora_rank, R rope dims, H_I x d_I indexer heads x dims, d V4 head_dim (one K=V head),
g x r_o V4 output groups x o_lora_rank, n hc_mult (mHC streams), W sliding window, m a layer's compress rate,
T the context a token attends to (itself included).

Design choices:
- Parameter counts follow transformers' module trees exactly (MTP modules excluded, buffers such as V4's `tid2eid`
  and the routers' score-correction bias are not parameters); tests compare them with `numel()` of transformers'
  models on tiny configs.
- KV bytes are what one sequence caches, divided by its length: V2/V3/V3.2 caches grow by a fixed amount per token,
  V4's sliding window is a constant W entries per layer, so its share per token depends on the context.
  The `stored*` keys use the formats DeepSeek's released kernels cache (FP8 / FP4 with scales, see
  `docs/deepseek-v32-v4.md`), the other keys a uniform `dtype_bytes` per element.
- FLOPs count 2 per multiply-add: the weight matmuls of the active parameters, plus QK^T and PV over the keys a
  token actually attends to, plus the lightning indexer's scores over every key it ranks. Elementwise work
  (softmax, RoPE, norms, compressor pooling, Sinkhorn) is left out; the mHC stream mixing is counted because it is
  a small matmul.
"""

from __future__ import annotations

import math
from fractions import Fraction

from workbench.config import CSA, HCA, SLIDING, ModelConfig

# The cache formats of DeepSeek's released inference code (sizes in bytes per cached entry):
# V3.2 (FlashMLA FP8 cache): latent in FP8 e4m3 with one fp32 scale per 128 values, rope key in bf16 -> 656 B;
#   indexer key in FP8 with one fp32 scale per 128 values -> 132 B.
# V4: compressed/window entry = nope dims in FP8 + rope dims in bf16 -> 576 B (the published size; the block-64
#   ue8m0 scales of the nope part are not in it); CSA indexer key in FP4 e2m1 (2 per byte) + one ue8m0 byte per
#   32 values -> 68 B.
_FP8_SCALE_BLOCK_V32, _FP32_SCALE_BYTES = 128, 4
_FP4_SCALE_BLOCK, _UE8M0_SCALE_BYTES = 32, 1


# ---------------------------------------------------------------------------------------------- parameters
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameters of the main model (MTP modules excluded), with a breakdown.

    `total` = embedding + lm_head + final norm (+ V4's hyper-connection head) + the per-layer parts below;
    `active` counts only `num_experts_per_tok` of the routed experts (hash-routed V4 layers pick as many).
    Breakdown keys (summed over layers): `attention` (projections, norms, V4 sinks), `indexer` (V3.2 token indexer,
    V4 CSA indexer incl. its compressor), `compressor` (V4 CSA/HCA compressors), `hyper_connections` (V4 mHC, head
    included), `norms` (the two per-layer RMSNorms + the final one), `dense_mlp`, `router`, `shared_experts`,
    `routed_experts` (all of them) and `routed_experts_active`.
    """
    D, V = config.hidden_size, config.vocab_size
    parts = dict.fromkeys(("attention", "indexer", "compressor", "hyper_connections", "norms", "dense_mlp", "router",
                           "shared_experts", "routed_experts", "routed_experts_active"), 0)
    for layer in range(config.num_hidden_layers):
        if config.is_v4:
            attn, compressor, indexer = _v4_attention_params(config, layer)
            parts["compressor"] += compressor
            parts["hyper_connections"] += 2 * _hyper_connection_params(config)
        else:
            attn, indexer = _mla_params(config), _v32_indexer_params(config)
        parts["attention"] += attn
        parts["indexer"] += indexer
        parts["norms"] += 2 * D
        if config.is_moe_layer(layer):
            per_expert = 3 * D * config.moe_intermediate_size
            parts["router"] += config.n_routed_experts * D
            parts["shared_experts"] += per_expert * config.n_shared_experts  # V4: validated to be 1
            parts["routed_experts"] += per_expert * config.n_routed_experts
            parts["routed_experts_active"] += per_expert * config.num_experts_per_tok
        else:
            parts["dense_mlp"] += 3 * D * config.intermediate_size
    parts["norms"] += D  # the final norm
    if config.is_v4:
        n = config.hc_mult
        parts["hyper_connections"] += n * n * D + n + 1  # the head's fn [n, nD], base [n], scale [1]
    embed = V * D
    head = 0 if config.tie_word_embeddings else V * D
    shared = sum(v for k, v in parts.items() if not k.startswith("routed_experts")) + embed + head
    return {"total": shared + parts["routed_experts"], "active": shared + parts["routed_experts_active"],
            "embedding": embed, "lm_head": head, **parts}


def _mla_params(config: ModelConfig) -> int:
    """One V2/V3 MLA layer: q (plain or low-rank with its norm), the latent kv projection + norm, kv_b, o_proj."""
    D, nH, C, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    qk = config.qk_head_dim
    if config.q_lora_rank is None:
        q = D * nH * qk
    else:
        q = D * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * nH * qk
    return q + D * (C + R) + C + C * nH * (config.qk_nope_head_dim + config.v_head_dim) + nH * config.v_head_dim * D


def _v32_indexer_params(config: ModelConfig) -> int:
    """V3.2's token indexer: wq_b [H_I d_I, q_lora], wk [d_I, D], k_norm weight + bias, weights_proj [H_I, D]."""
    if config.model_type != "deepseek_v32":
        return 0
    H_I, d_I, D = config.index_n_heads, config.index_head_dim, config.hidden_size
    assert config.q_lora_rank is not None  # validate() requires it for V3.2
    return H_I * d_I * config.q_lora_rank + d_I * D + 2 * d_I + H_I * D


def _v4_attention_params(config: ModelConfig, layer: int) -> tuple[int, int, int]:
    """(attention, compressor, indexer) parameters of one V4 layer.

    Attention: wq_a [q_lora, D] + q_norm, wq_b [nH d, q_lora], wkv [d, D] + kv norm, grouped output
    wo_a [g r_o, nH d / g] and wo_b [D, g r_o], sinks [nH]. A compressor at rate m pools c = 2 (CSA, overlapping
    windows) or 1 (HCA) series: wkv, wgate [c d, D], ape [m, c d], norm [d]. CSA adds the indexer: its own
    overlapping compressor at width d_I (rate 4), wq_b [H_I d_I, q_lora], weights_proj [H_I, D].
    """
    D, nH, d, q_lora = config.hidden_size, config.num_attention_heads, config.head_dim, config.q_lora_rank
    assert q_lora is not None  # V4 always has a query latent
    g_r = config.o_groups * config.o_lora_rank
    attn = D * q_lora + q_lora + q_lora * nH * d + D * d + d + g_r * (nH * d // config.o_groups) + D * g_r + nH
    kind, m = config.attention_kind(layer), config.compress_ratio(layer)
    if kind == SLIDING:
        return attn, 0, 0
    series = 2 if kind == CSA else 1
    compressor = _compressor_params(D, series * d, m, d)
    if kind == HCA:
        return attn, compressor, 0
    H_I, d_I = config.index_n_heads, config.index_head_dim
    indexer = _compressor_params(D, 2 * d_I, m, d_I) + H_I * d_I * q_lora + H_I * D
    return attn, compressor, indexer


def _compressor_params(D: int, width: int, rate: int, out: int) -> int:
    return 2 * width * D + rate * width + out  # wkv + wgate [width, D], ape [rate, width], norm [out]


def _hyper_connection_params(config: ModelConfig) -> int:
    """One mHC site (before attention or the MoE): fn [(2+n)n, nD], base [(2+n)n], scale [3]."""
    n = config.hc_mult
    mix = (2 + n) * n
    return mix * n * config.hidden_size + mix + 3


# ---------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, gqa_groups: int | None = None, *,
                       context: int | None = None) -> dict[str, float]:
    """Bytes cached per token over all layers.

    V2/V3: MLA's latent vs the MHA / GQA caches of the same attention shape (keys `mla`, `mha`, `gqa`, ...);
    V3.2 adds its indexer keys (`indexer`); V4 splits into `window`, `compressed` and `indexer` at a context
    length. `total` is the whole cache per token at `dtype_bytes` per element and `stored` the same in DeepSeek's
    released cache formats (fixed sizes, `dtype_bytes` does not apply). `context` matters only for V4 (its window
    is W entries per layer whatever the length): None means the long-context limit, where the window's share
    vanishes and a rate-m layer adds exactly 1/m entry per token.
    """
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be positive, got {dtype_bytes}")
    if context is not None and context < 1:
        raise ValueError(f"context must be >= 1 token (or None for the long-context limit), got {context}")
    if config.is_v4:
        return _v4_kv_bytes(config, dtype_bytes, context)
    out = _mla_kv_bytes(config, dtype_bytes, gqa_groups)
    if config.model_type == "deepseek_v32":
        L, d_I = config.num_hidden_layers, config.index_head_dim
        out["indexer"] = float(L * d_I * dtype_bytes)
        out["indexer_elements_per_layer"] = float(d_I)
        out["total"] = out["mla"] + out["indexer"]
        out["stored_mla"] = float(L * _v32_mla_entry_bytes(config))
        out["stored_indexer"] = float(L * _fp8_key_bytes(d_I))
        out["stored"] = out["stored_mla"] + out["stored_indexer"]
    return out


def _mla_kv_bytes(config: ModelConfig, dtype_bytes: int, gqa_groups: int | None) -> dict[str, float]:
    """MLA caches c_kv (C) + the shared rope key (R) per layer. MHA caches per head a key of qk_head_dim and a value
    of v_head_dim. GQA shares each key/value head among nH / groups query heads (`gqa_groups`, default the config's
    num_key_value_heads when it is smaller than nH, else 8, or nH / 2 for small models)."""
    L, nH = config.num_hidden_layers, config.num_attention_heads
    mla_elements = config.kv_lora_rank + config.qk_rope_head_dim
    per_head = config.qk_head_dim + config.v_head_dim
    if gqa_groups is None:
        kvh = config.num_key_value_heads
        gqa_groups = kvh if kvh is not None and kvh < nH else (8 if nH > 8 else max(1, nH // 2))
    mla = float(L * mla_elements * dtype_bytes)
    return {
        "mla": mla,
        "mha": float(L * nH * per_head * dtype_bytes),
        "gqa": float(L * gqa_groups * per_head * dtype_bytes),
        "gqa_groups": float(gqa_groups),
        "mla_elements_per_layer": float(mla_elements),
        # GQA groups whose cache equals MLA's, per-head key/value width d_h = v_head_dim as in DeepSeek-V2's
        # Table 1 (it reports 2.25 for d_c = 4 d_h, d_h^R = d_h / 2)
        "mla_equivalent_gqa_groups": mla_elements / (2 * config.v_head_dim),
        "total": mla,
        "stored": float(L * mla_elements * 2),  # DeepSeek-V2/V3's inference code caches bf16
    }


def _v32_mla_entry_bytes(config: ModelConfig) -> int:
    return _fp8_key_bytes(config.kv_lora_rank) + 2 * config.qk_rope_head_dim  # FP8 latent + scales, bf16 rope key


def _fp8_key_bytes(width: int) -> int:
    return width + math.ceil(width / _FP8_SCALE_BLOCK_V32) * _FP32_SCALE_BYTES


def _v4_entry_bytes(config: ModelConfig) -> int:
    return (config.head_dim - config.qk_rope_head_dim) + 2 * config.qk_rope_head_dim  # FP8 nope + bf16 rope


def _fp4_key_bytes(width: int) -> int:
    return width // 2 + math.ceil(width / _FP4_SCALE_BLOCK) * _UE8M0_SCALE_BYTES


def _v4_kv_bytes(config: ModelConfig, dtype_bytes: int, context: int | None) -> dict[str, float]:
    """Per layer: the window keeps min(W, T) entries of width d (K = V, one head); a rate-m layer keeps T // m
    compressed entries of width d; a CSA layer also keeps T // 4 indexer keys of width d_I. Divided by T."""
    d, d_I, W = config.head_dim, config.index_head_dim, config.sliding_window
    # entries per token summed over layers, exact until the final division (the long-context limit: 1/m per layer)
    window = compressed = indexer = Fraction(0)
    for layer in range(config.num_hidden_layers):
        m = config.compress_ratio(layer)
        if context is not None:
            window += Fraction(min(W, context), context)
        if m:
            share = Fraction(1, m) if context is None else Fraction(context // m, context)
            compressed += share
            if config.attention_kind(layer) == CSA:
                indexer += share
    counts = {kind: sum(config.attention_kind(i) == kind for i in range(config.num_hidden_layers))
              for kind in (SLIDING, CSA, HCA)}
    entry, key = _v4_entry_bytes(config), _fp4_key_bytes(d_I)
    out = {
        "window": float(window * d * dtype_bytes),
        "compressed": float(compressed * d * dtype_bytes),
        "indexer": float(indexer * d_I * dtype_bytes),
        "stored_window": float(window * entry),
        "stored_compressed": float(compressed * entry),
        "stored_indexer": float(indexer * key),
        "context": math.inf if context is None else float(context),
        "sliding_layers": float(counts[SLIDING]),
        "csa_layers": float(counts[CSA]),
        "hca_layers": float(counts[HCA]),
        "entry_bytes_stored": float(entry),
        "indexer_key_bytes_stored": float(key),
    }
    out["total"] = out["window"] + out["compressed"] + out["indexer"]
    out["stored"] = out["stored_window"] + out["stored_compressed"] + out["stored_indexer"]
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def estimate_flops(config: ModelConfig, context: int = 1) -> dict[str, float]:
    """Forward FLOPs of one token that attends to `context` tokens (itself included), 2 per multiply-add.

    `matmul`: the active weights (embedding lookup is free); `attention`: QK^T + PV over the keys the token attends
    to (V2/V3 all T, V3.2 the index_topk selected, V4 its window + compressed entries: all visible ones in HCA
    layers, the index_topk selected in CSA layers); `indexer`: the lightning indexer scoring every key it ranks
    (V3.2 all T tokens, V4 the T // 4 compressed entries of CSA layers); `hyper_connections`: V4's stream mixing.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    counts = parameter_counts(config)
    matmul = 2.0 * (counts["active"] - counts["embedding"])
    attention = indexer = mixing = 0.0
    T = context
    for layer in range(config.num_hidden_layers):
        if config.is_v4:
            a, i = _v4_attention_flops(config, layer, T)
        elif config.model_type == "deepseek_v32":
            a = _mla_attention_flops(config, min(T, config.index_topk))
            i = _indexer_flops(config, T)
        else:
            a, i = _mla_attention_flops(config, T), 0.0
        attention += a
        indexer += i
    if config.is_v4:
        n, D = config.hc_mult, config.hidden_size
        # per mHC site: collapse n streams (n D), expand the sublayer output (n D), mix the streams (n^2 D)
        mixing = 2.0 * (2 * config.num_hidden_layers * (n * n + 2 * n) * D + n * D)
    return {"matmul": matmul, "attention": attention, "indexer": indexer, "hyper_connections": mixing,
            "total": matmul + attention + indexer + mixing,
            "params_active": float(counts["active"]), "params_total": float(counts["total"])}


def _mla_attention_flops(config: ModelConfig, keys: int) -> float:
    """QK^T over qk_head_dim and PV over v_head_dim, per head (the per-head view; the absorbed decode path costs
    more per key, C + R and C, but both scale the same way with the keys)."""
    return 2.0 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * keys


def _indexer_flops(config: ModelConfig, keys: int) -> float:
    """H_I dot products of width d_I per key, then the weighted sum over the H_I heads."""
    return 2.0 * config.index_n_heads * (config.index_head_dim + 1) * keys


def _v4_attention_flops(config: ModelConfig, layer: int, T: int) -> tuple[float, float]:
    """(core attention, indexer) of one V4 layer: nH heads of width d against a K = V key, so QK^T and PV cost
    2 nH d each per key."""
    kind, m = config.attention_kind(layer), config.compress_ratio(layer)
    keys = min(config.sliding_window, T)
    indexer = 0.0
    if kind == HCA:
        keys += T // m
    elif kind == CSA:
        entries = T // m
        keys += min(config.index_topk, entries)
        indexer = _indexer_flops(config, entries)
    return 4.0 * config.num_attention_heads * config.head_dim * keys, indexer
