"""ModelConfig: exact round trip with HF config.json, presets, and clear errors for impossible configs."""

from __future__ import annotations

import json

import pytest

from tests.hf_models import BASE, VARIANTS
from workbench.config import CSA, HCA, PRESETS, ConfigError, ModelConfig

# A real DeepSeek-V3 config.json (the published one, abridged to the keys it has), in the 4.x rope layout.
V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}


@pytest.mark.parametrize("data", [V3_JSON, V2_LITE_JSON], ids=["v3", "v2-lite"])
def test_published_configs_round_trip_exactly(data):
    cfg = ModelConfig.from_hf_dict(data)
    assert cfg.to_hf_dict() == data
    assert json.loads(json.dumps(cfg.to_hf_dict())) == data


def test_published_v3_config_matches_preset_shapes():
    cfg = ModelConfig.from_hf_dict(V3_JSON)
    assert cfg == PRESETS["deepseek-v3"].replace(rope_theta=10000, rope_scaling=V3_JSON["rope_scaling"])
    assert cfg.moe_layers[0] == 3 and len(cfg.moe_layers) == 58
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 1.0 * __import__("math").log(40) + 1) ** 2)


@pytest.mark.parametrize(("variant", "model_type", "overrides"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_transformers_written_configs_round_trip(tmp_path, variant, model_type, overrides):
    transformers = pytest.importorskip("transformers")
    cls = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    cls(**{**BASE, **overrides}).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.to_hf_dict() == data
    cfg.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data


def test_presets_are_valid_and_named():
    assert {"tiny", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"} <= set(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset 'v9'"):
        ModelConfig.from_name("v9")


@pytest.mark.parametrize(("change", "message"), [
    ({"num_experts_per_tok": 17}, "num_experts_per_tok=17 must be in 1..n_routed_experts=16"),
    ({"n_group": 3}, "n_routed_experts=16 is not divisible by n_group=3"),
    ({"topk_group": 5}, "topk_group=5 must be in 1..n_group=4"),
    ({"topk_group": 1, "num_experts_per_tok": 5}, "cannot hold num_experts_per_tok=5"),
    ({"kv_lora_rank": 0}, "kv_lora_rank must be positive"),
    ({"q_lora_rank": -3}, "q_lora_rank must be null or positive"),
    ({"qk_rope_head_dim": 7}, "must be even"),
    ({"scoring_func": "relu"}, "scoring_func must be softmax|sigmoid"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
])
def test_impossible_configs_are_refused_with_the_field_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PRESETS["tiny"].replace(**change)


def test_non_deepseek_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not one of .*deepseek_v4"):
        ModelConfig.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


# --------------------------------------------------------------------------- V3.2 and V4

# DeepSeek-V4-Pro's published config.json (DeepSeek's hub form: per-layer compress_ratios with the MTP entry last,
# num_hash_layers, top-level rope_theta + rope_scaling for the compressed layers).
V4_PRO_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 1024,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 3072, "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 61, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 16, "o_lora_rank": 1024,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0],
}

TINY_V4 = dict(
    vocab_size=96, hidden_size=64, moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
    qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
    index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, swiglu_limit=1.0,
    max_position_embeddings=128,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
                  "beta_slow": 1},
)


def test_v4_hub_config_round_trips_and_reads_deepseeks_layer_rule():
    cfg = ModelConfig.from_hf_dict(V4_PRO_JSON)
    assert cfg.to_hf_dict() == V4_PRO_JSON
    assert cfg.config_form == "hub" and cfg.num_hash_layers == 3 and len(cfg.compress_ratios) == 61
    kinds = [cfg.attention_kind(i) for i in range(61)]
    assert kinds.count("heavily_compressed_attention") == 31 and kinds.count("compressed_sparse_attention") == 30
    assert cfg.rope_theta == 10000 and cfg.compress_rope_theta == 160000 and cfg.rope_scaling["factor"] == 16
    assert cfg == PRESETS["deepseek-v4-pro"].replace(hf_extra=cfg.hf_extra)


def test_v4_hub_form_any_other_ratio_is_hca_at_that_rate():
    d = {**V4_PRO_JSON, "num_hidden_layers": 3, "compress_ratios": [0, 4, 16, 0]}
    cfg = ModelConfig.from_hf_dict(d)
    assert [cfg.compress_ratio(i) for i in range(3)] == [0, 4, 16]
    assert [cfg.attention_kind(i) for i in range(3)] == ["sliding_attention", "compressed_sparse_attention",
                                                         "heavily_compressed_attention"]


def test_v4_hub_form_with_transformers_hca_override_means_what_transformers_reads():
    transformers = pytest.importorskip("transformers")
    d = {**V4_PRO_JSON, "num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0], "compress_rate_hca": 8}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.compress_ratios == (0, 4, 8) and cfg.to_hf_dict() == d
    hf = transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert [hf.compress_rates[t] if t != "sliding_attention" else 0 for t in hf.layer_types] == [0, 4, 8]
    with pytest.raises(ConfigError, match="compress_rate_csa=8"):
        ModelConfig.from_hf_dict({**d, "compress_rate_csa": 8})


def test_v4_transformers_config_round_trips_and_transformers_reads_ours():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV4Config(**TINY_V4)
    for d in (json.loads(hf.to_json_string(use_diff=False)), hf.to_diff_dict()):
        cfg = ModelConfig.from_hf_dict(d)
        assert cfg.to_hf_dict() == d
        assert cfg.compress_ratios == (0, 4, 8, 4) and cfg.num_hash_layers == 2 and cfg.config_form == "hf"
        assert cfg.compress_rope_theta == 160000.0 and cfg.rope_scaling["factor"] == 4
    # both forms we write are read back by transformers to the same layer pattern and rope tables (transformers
    # reads hub-form ratios as the labels 0/4/128 only, so the hub form is checked at DeepSeek's HCA rate 128)
    for form, ratios in (("hf", (0, 4, 8, 4)), ("hub", (0, 4, 128, 4))):
        ours = cfg.replace(config_form=form, compress_ratios=ratios, hf_extra={}).to_hf_dict()
        again = transformers.DeepseekV4Config(**{k: v for k, v in ours.items() if k != "model_type"})
        assert again.layer_types == hf.layer_types and again.mlp_layer_types == hf.mlp_layer_types
        assert again.compress_rates[CSA] == 4 and again.qk_rope_head_dim == 8
        assert again.compress_rates[HCA] == (8 if form == "hf" else 128)
        assert again.rope_parameters["compress"]["factor"] == 4
        assert again.rope_parameters["compress"]["rope_theta"] == 160000.0
        assert again.rope_parameters["main"]["rope_theta"] == 10000.0


def test_v32_transformers_config_round_trips():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV32Config(vocab_size=96, index_topk=6, index_n_heads=16, index_head_dim=80)
    for d in (json.loads(hf.to_json_string(use_diff=False)), hf.to_diff_dict()):
        cfg = ModelConfig.from_hf_dict(d)
        assert cfg.to_hf_dict() == d
        assert (cfg.model_type, cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == ("deepseek_v32", 6, 16, 80)
    assert PRESETS["deepseek-v3.2"].index_topk == 2048


@pytest.mark.parametrize(("d", "message"), [
    ({**V4_PRO_JSON, "compress_ratios": [0, 4]}, "compress_ratios has 2 entries for num_hidden_layers=61"),
    ({**V4_PRO_JSON, "o_groups": 7}, "o_groups=7 must be positive and divide num_attention_heads=128"),
    ({**V4_PRO_JSON, "num_hash_layers": 62}, "num_hash_layers=62 must be in 0..61"),
    ({**V4_PRO_JSON, "scoring_func": "softmax"}, "scoring_func must be sqrtsoftplus|sigmoid for deepseek_v4"),
    ({**V4_PRO_JSON, "n_shared_experts": 2}, "one shared expert"),
    ({**V4_PRO_JSON, "index_n_heads": 0}, "index_n_heads must be positive for V4 CSA's indexer"),
    ({**V4_PRO_JSON, "qk_rope_head_dim": 1024}, "qk_rope_head_dim=1024 must fit in head_dim=512"),
    ({k: v for k, v in V4_PRO_JSON.items() if k != "compress_ratios"}, "needs compress_ratios"),
    ({"model_type": "deepseek_v4", **TINY_V4,
      "compress_rates": {"compressed_sparse_attention": 8}}, r"CSA layers compress by 4"),
    ({"model_type": "deepseek_v4", **TINY_V4, "layer_types": ["sliding_attention", "full_attention",
                                                              "sliding_attention", "sliding_attention"]},
     r"layer_types\[1\]='full_attention'"),
    ({"model_type": "deepseek_v4", **TINY_V4, "mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]},
     "hash_moe layers first"),
    ({"model_type": "deepseek_v32", "q_lora_rank": None, "index_n_heads": 4, "index_head_dim": 16,
      "index_topk": 4}, "q_lora_rank must be set for deepseek_v32"),
    ({"model_type": "deepseek_v32", "q_lora_rank": 16, "index_n_heads": 4, "index_head_dim": 4,
      "index_topk": 4, "qk_rope_head_dim": 8}, "index_head_dim=4 must hold the qk_rope_head_dim=8"),
    ({"model_type": "deepseek_v3", "scoring_func": "sqrtsoftplus"}, "'sqrtsoftplus' is V4's"),
    ({"model_type": "deepseek_v3", "num_hidden_layers": 3, "first_k_dense_replace": 1,
      "mlp_layer_types": ["dense", "dense", "sparse"]}, "mlp_layer_types .* disagrees with first_k_dense_replace=1"),
])
def test_impossible_v32_v4_configs_name_the_field(d, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(d)
