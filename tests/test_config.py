"""ModelConfig: exact round trip with HF config.json, presets, and clear errors for impossible configs."""

from __future__ import annotations

import json

import pytest

from tests.hf_models import BASE, VARIANTS
from workbench.config import PRESETS, ConfigError, ModelConfig

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
