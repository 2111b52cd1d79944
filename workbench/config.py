"""ModelConfig: the DeepSeek-V2/V3 hyper-parameters under DeepSeek's own field names.

Design choices:
- Frozen dataclass, so a config can key caches and be shared between a model, a trace and a session safely.
- One explicit table (`_HF_FIELDS`) between HF `config.json` keys and ours; everything we do not model is kept
  verbatim in `hf_extra`, so `ModelConfig.from_hf_dict(d).to_hf_dict() == d` holds exactly.
- transformers 4.x wrote `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters` (with `rope_theta` inside).
  Both are read; the layout that was read is the layout written back (`rope_layout`).
- `validate()` rejects impossible shapes with a message naming the field, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

ScoringFunc = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
RopeLayout = Literal["rope_parameters", "rope_scaling"]

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


class ConfigError(ValueError):
    """A configuration that no DeepSeek model could have; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: Literal["deepseek_v2", "deepseek_v3"] = "deepseek_v3"
    vocab_size: int = 512  # tokenizer size
    hidden_size: int = 64  # residual stream width H
    intermediate_size: int = 128  # dense MLP width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 32  # width I of each routed / shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # unused by MLA; kept for config round trips and GQA cost maths
    # --- MoE ---
    n_routed_experts: int = 8  # E
    n_shared_experts: int = 1  # shared experts, fused as one MLP of width n_shared * I
    num_experts_per_tok: int = 2  # top-k
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups a token may route into
    topk_method: TopkMethod = "noaux_tc"  # greedy | group_limited_greedy (V2, max per group) | noaux_tc (V3, top-2 sum)
    scoring_func: ScoringFunc = "sigmoid"
    norm_topk_prob: bool = True  # renormalise the chosen weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed output
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP
    moe_layer_freq: int = 1  # V2 field: every n-th layer after the dense ones is MoE
    # --- MLA ---
    q_lora_rank: int | None = None  # None: plain q_proj (V2-Lite); else low-rank q
    kv_lora_rank: int = 32  # latent width C of the KV cache
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8  # R, shared rope key width
    v_head_dim: int = 16
    # --- position / norm / misc ---
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # YaRN: {type/rope_type, factor, original_max_position_embeddings, ...}
    rope_interleave: bool = True  # rope dims stored as interleaved pairs (DeepSeek's layout)
    rope_layout: RopeLayout = "rope_parameters"
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint (skipped when loading)
    hf_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(all_dim)^2 under YaRN (the attention-temperature correction)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rope_type(rs) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim") or 0
            if mscale_all_dim:
                m = yarn_mscale(float(rs["factor"]), float(mscale_all_dim))
                scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be null or positive, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        need(self.scoring_func in ("softmax", "sigmoid"), f"scoring_func must be softmax|sigmoid, got {self.scoring_func!r}")
        need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
             f"topk_method must be greedy|group_limited_greedy|noaux_tc, got {self.topk_method!r}")
        need(self.n_routed_experts >= 0, f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        need(self.first_k_dense_replace >= 0, f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            need(self.moe_intermediate_size > 0, f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}")
            need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok={self.num_experts_per_tok} choices")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(per_group >= 2, f"noaux_tc scores a group by its top-2 experts; groups of {per_group} are too small")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            need(self.intermediate_size > 0, f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.rope_scaling:
            rt = rope_type(self.rope_scaling)
            need(rt in ("default", "yarn"), f"rope_scaling type {rt!r} is not supported (default or yarn)")
            if rt == "yarn":
                need(float(self.rope_scaling.get("factor", 0)) >= 1.0, "rope_scaling.factor must be >= 1 for yarn")
                need("original_max_position_embeddings" in self.rope_scaling,
                     "rope_scaling needs original_max_position_embeddings for yarn")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = d.get("architectures") or []
            model_type = next((m for m, a in ARCHITECTURES.items() if a in archs), None)
            if model_type is None:
                raise ConfigError(f"config.json: model_type {d.get('model_type')!r} / architectures {archs} "
                                  "is not DeepSeek-V2 or V3")
        kw: dict[str, Any] = {"model_type": model_type}
        extra: dict[str, Any] = {}
        is_v3 = model_type == "deepseek_v3"
        present: list[str] = []
        for key, value in d.items():
            if key in _HF_FIELDS:
                kw[key] = value
                present.append(key)
            elif key not in ("model_type", "rope_parameters", "rope_scaling", "rope_theta"):
                extra[key] = value
        # rope: 5.x nests rope_theta inside rope_parameters; 4.x keeps rope_theta top-level + rope_scaling
        if "rope_parameters" in d and d["rope_parameters"] is not None:
            rp = dict(d["rope_parameters"])
            kw["rope_layout"] = "rope_parameters"
            kw["rope_theta"] = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
            kw["rope_scaling"] = rp
            if "rope_theta" in d:
                extra["rope_theta"] = d["rope_theta"]
        else:
            kw["rope_layout"] = "rope_scaling"
            kw["rope_theta"] = float(d.get("rope_theta", 10000.0))
            kw["rope_scaling"] = d.get("rope_scaling")
            if "rope_scaling" not in d:
                extra["__no_rope_scaling_key__"] = True
            if "rope_theta" not in d:
                extra["__no_rope_theta_key__"] = True
        # fields whose defaults differ by generation when the file leaves them out (transformers omits them for V3)
        kw.setdefault("scoring_func", "sigmoid" if is_v3 else "softmax")
        kw.setdefault("topk_method", "noaux_tc" if is_v3 else "greedy")
        for key in ("n_group", "topk_group"):
            if kw.get(key) is None:
                kw[key] = 1
        if kw.get("num_experts_per_tok") is None:
            kw["num_experts_per_tok"] = 1
        if kw.get("q_lora_rank", 0) is None:
            kw["q_lora_rank"] = None
        if not is_v3 and "rope_interleave" not in kw:
            kw["rope_interleave"] = True  # V2 always rotates interleaved pairs
        extra["__present__"] = present
        extra["__nulls__"] = [k for k in ("n_group", "topk_group", "num_experts_per_tok") if d.get(k, 0) is None]
        return cls(**kw, hf_extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        extra = dict(self.hf_extra)
        present = extra.pop("__present__", None)
        nulls = set(extra.pop("__nulls__", []))
        no_scaling_key = extra.pop("__no_rope_scaling_key__", False)
        no_theta_key = extra.pop("__no_rope_theta_key__", False)
        out: dict[str, Any] = {"model_type": self.model_type}
        keys = present if present is not None else [
            k for k in _HF_FIELDS if k not in _NOT_IN_V2 or self.model_type == "deepseek_v3"]
        for key in keys:
            value = getattr(self, key)
            out[key] = None if key in nulls else (dict(value) if isinstance(value, Mapping) else value)
        if present is None:
            out["architectures"] = [self.architecture]
        if self.rope_layout == "rope_parameters":
            rp = dict(self.rope_scaling or {"rope_type": "default"})
            rp["rope_theta"] = self.rope_theta
            out["rope_parameters"] = dict(sorted(rp.items()))
        else:
            if not no_theta_key:
                out["rope_theta"] = self.rope_theta
            if not no_scaling_key:
                out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        out.update(extra)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


# HF config.json keys that map 1:1 onto ModelConfig fields (rope keys are handled separately)
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
    "first_k_dense_replace", "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "rope_interleave", "rms_norm_eps", "hidden_act",
    "attention_bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "num_nextn_predict_layers",
)
_NOT_IN_V2 = ("rope_interleave",)


def rope_type(rope_scaling: Mapping[str, Any]) -> str:
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(s) + 1 (1 when not extrapolating)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_YARN_V2 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_YARN_V3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, ModelConfig] = {
    # CPU-sized, V3-style: MLA + sigmoid gate with group-limited routing + shared expert + one dense layer
    "tiny": ModelConfig(
        model_type="deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=1024,
    ),
    "deepseek-v2-lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_scaling=_YARN_V2, rope_layout="rope_scaling",
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v2": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=16.0, first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling=_YARN_V2, rope_layout="rope_scaling", bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v3": ModelConfig(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_scaling=_YARN_V3, rope_layout="rope_scaling",
        bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
    ),
}
