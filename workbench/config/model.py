"""ModelConfig: the DeepSeek-V2/V3/V3.2/V4 hyper-parameters under DeepSeek's own field names, and the presets.

Design choices:
- Frozen dataclass, so a config can key caches and be shared between a model, a trace and a session safely.
- One explicit table (`_HF_FIELDS`) between HF `config.json` keys and ours; everything we do not model is kept
  verbatim in `hf_extra`, so `ModelConfig.from_hf_dict(d).to_hf_dict() == d` holds exactly.
- transformers 4.x wrote `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters` (with `rope_theta` inside).
  Both are read; the layout that was read is the layout written back (`rope_layout`).
- V4's two config.json forms are read and written by `workbench.config.v4_forms`.
- `validate()` rejects impossible shapes with a message naming the field, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.config.names import (
    ARCHITECTURES,
    CSA,
    CSA_RATIO,
    HCA,
    INDEX_FIELDS,
    SLIDING,
    ConfigError,
    ConfigForm,
    ModelType,
    RopeLayout,
    ScoringFunc,
    TopkMethod,
    rope_type,
    yarn_mscale,
)
from workbench.config.v4_forms import v4_from_hf, v4_to_hf


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: ModelType = "deepseek_v3"
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
    # --- lightning indexer (V3.2 over tokens, V4 over compressed entries; 0 heads = none) ---
    index_n_heads: int = 0  # H_I
    index_head_dim: int = 0  # d_I
    index_topk: int = 0  # entries kept per query
    # --- V4 attention (single shared K=V head of width head_dim; MLA fields above unused) ---
    head_dim: int = 0  # d
    o_groups: int = 0  # grouped low-rank output projection: groups g ...
    o_lora_rank: int = 0  # ... each projected to this rank
    sliding_window: int = 0  # W: window keys per query, self included
    compress_ratios: tuple[int, ...] = ()  # per layer: 0 window only, 4 CSA, other m HCA at rate m (DeepSeek's rule)
    compress_rope_theta: float = 160000.0  # rope base of compressed layers (rope_scaling applies to these only)
    hc_mult: int = 4  # mHC residual streams n
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    num_hash_layers: int = 0  # the first layers route by tid2eid[token id], not by score
    swiglu_limit: float | None = None  # clamp of SwiGLU's gate (above) and up (both sides); None: no clamp
    config_form: ConfigForm = "hf"  # V4: which config.json form was read, and is written back
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
        if self.is_v4:
            return True  # every V4 layer is MoE
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def is_v4(self) -> bool:
        return self.model_type == "deepseek_v4"

    def compress_ratio(self, layer: int) -> int:
        """V4: the layer's compression rate m (0 = sliding window only)."""
        return self.compress_ratios[layer] if self.is_v4 else 0

    def attention_kind(self, layer: int) -> str:
        """V4: SLIDING | CSA | HCA (transformers' layer_types names) of one layer."""
        m = self.compress_ratio(layer)
        return SLIDING if m == 0 else CSA if m == CSA_RATIO else HCA

    def is_hash_layer(self, layer: int) -> bool:
        return self.is_v4 and layer < self.num_hash_layers

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

        need(self.model_type in ARCHITECTURES, f"model_type must be one of {sorted(ARCHITECTURES)}, got "
             f"{self.model_type!r}")
        mla = ("kv_lora_rank", "v_head_dim") if not self.is_v4 else ()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", *mla,
                     "qk_rope_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.model_type == "deepseek_v32":
            self._validate_indexer(need, "V3.2")
            need(self.q_lora_rank is not None, "q_lora_rank must be set for deepseek_v32 (its indexer reads the "
                 "query latent)")
        if self.is_v4:
            self._validate_v4(need)
        else:
            need(self.scoring_func != "sqrtsoftplus", "scoring_func 'sqrtsoftplus' is V4's; use softmax|sigmoid "
                 f"for {self.model_type}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be null or positive, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        need(self.scoring_func in ("softmax", "sigmoid", "sqrtsoftplus"),
             f"scoring_func must be softmax|sigmoid|sqrtsoftplus, got {self.scoring_func!r}")
        need(self.swiglu_limit is None or self.swiglu_limit > 0,
             f"swiglu_limit must be null or positive, got {self.swiglu_limit}")
        need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
             f"topk_method must be greedy|group_limited_greedy|noaux_tc, got {self.topk_method!r}")
        need(self.n_routed_experts >= 0, f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        need(self.first_k_dense_replace >= 0, f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if not self.is_v4 and self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
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
        if not self.is_v4 and (self.first_k_dense_replace > 0 or self.n_routed_experts == 0):
            need(self.intermediate_size > 0, f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.rope_scaling:
            rt = rope_type(self.rope_scaling)
            need(rt in ("default", "yarn"), f"rope_scaling type {rt!r} is not supported (default or yarn)")
            if rt == "yarn":
                need(float(self.rope_scaling.get("factor", 0)) >= 1.0, "rope_scaling.factor must be >= 1 for yarn")
                need("original_max_position_embeddings" in self.rope_scaling,
                     "rope_scaling needs original_max_position_embeddings for yarn")

    def _validate_indexer(self, need: Any, family: str) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            need(getattr(self, name) > 0, f"{name} must be positive for {family}'s indexer, got {getattr(self, name)}")
        need(self.index_head_dim >= self.qk_rope_head_dim,
             f"index_head_dim={self.index_head_dim} must hold the qk_rope_head_dim={self.qk_rope_head_dim} rope dims")

    def _validate_v4(self, need: Any) -> None:
        L = self.num_hidden_layers
        need(self.head_dim > 0, f"head_dim must be positive for deepseek_v4, got {self.head_dim}")
        need(self.qk_rope_head_dim <= self.head_dim,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must fit in head_dim={self.head_dim}")
        need(self.q_lora_rank is not None, "q_lora_rank must be set for deepseek_v4")
        need(self.o_groups > 0 and self.num_attention_heads % self.o_groups == 0,
             f"o_groups={self.o_groups} must be positive and divide num_attention_heads={self.num_attention_heads}")
        need(self.o_lora_rank > 0, f"o_lora_rank must be positive for deepseek_v4, got {self.o_lora_rank}")
        need(self.sliding_window > 0, f"sliding_window must be positive for deepseek_v4, got {self.sliding_window}")
        need(len(self.compress_ratios) == L,
             f"compress_ratios has {len(self.compress_ratios)} entries for num_hidden_layers={L}")
        need(all(isinstance(m, int) and m >= 0 for m in self.compress_ratios),
             f"compress_ratios must be integers >= 0 (0: window only), got {list(self.compress_ratios)}")
        if any(m == CSA_RATIO for m in self.compress_ratios):
            self._validate_indexer(need, "V4 CSA")
        need(0 <= self.num_hash_layers <= L, f"num_hash_layers={self.num_hash_layers} must be in 0..{L}")
        need(self.hc_mult >= 1, f"hc_mult must be >= 1, got {self.hc_mult}")
        need(self.hc_sinkhorn_iters >= 1, f"hc_sinkhorn_iters must be >= 1, got {self.hc_sinkhorn_iters}")
        need(self.hc_eps > 0, f"hc_eps must be positive, got {self.hc_eps}")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid"),
             f"scoring_func must be sqrtsoftplus|sigmoid for deepseek_v4, got {self.scoring_func!r}")
        need(self.n_group == 1 and self.topk_group == 1,
             f"deepseek_v4 routes without expert groups; got n_group={self.n_group}, topk_group={self.topk_group}")
        need(self.n_shared_experts == 1,
             f"deepseek_v4 has one shared expert of width moe_intermediate_size; got n_shared_experts="
             f"{self.n_shared_experts}")
        need(self.n_routed_experts > 0 and 1 <= self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}")
        need(self.moe_intermediate_size > 0, f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Read an HF config.json dict (transformers 4.x or 5.x; for V4 also DeepSeek's hub form)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = d.get("architectures") or []
            model_type = next((m for m, a in ARCHITECTURES.items() if a in archs), None)
            if model_type is None:
                raise ConfigError(f"config.json: model_type {d.get('model_type')!r} / architectures {archs} "
                                  f"is not one of {sorted(ARCHITECTURES)}")
        if model_type == "deepseek_v4":
            v4_fields, v4_extra = v4_from_hf(d)
            return cls(**v4_fields, hf_extra=v4_extra)
        fields = _HF_FIELDS + (INDEX_FIELDS if model_type == "deepseek_v32" else ())
        kw: dict[str, Any] = {"model_type": model_type}
        extra: dict[str, Any] = {}
        is_v3 = model_type in ("deepseek_v3", "deepseek_v32")
        present: list[str] = []
        for key, value in d.items():
            if key in fields:
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
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is not None:  # transformers 5.x: must say what first_k_dense_replace says
            L, k = int(kw.get("num_hidden_layers", 2)), int(kw.get("first_k_dense_replace", 1))
            if list(mlp_types) != ["dense"] * min(k, L) + ["sparse"] * max(L - k, 0):
                raise ConfigError(f"config.json: mlp_layer_types {list(mlp_types)} disagrees with "
                                  f"first_k_dense_replace={k} over num_hidden_layers={L}")
        extra["__present__"] = present
        extra["__nulls__"] = [k for k in ("n_group", "topk_group", "num_experts_per_tok") if d.get(k, 0) is None]
        return cls(**kw, hf_extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dict; `from_hf_dict(d).to_hf_dict() == d` for every form read."""
        if self.is_v4:
            return v4_to_hf(self)
        extra = dict(self.hf_extra)
        present = extra.pop("__present__", None)
        nulls = set(extra.pop("__nulls__", []))
        no_scaling_key = extra.pop("__no_rope_scaling_key__", False)
        no_theta_key = extra.pop("__no_rope_theta_key__", False)
        out: dict[str, Any] = {"model_type": self.model_type}
        fields = _HF_FIELDS + (INDEX_FIELDS if self.model_type == "deepseek_v32" else ())
        keys = present if present is not None else [
            k for k in fields if k not in _NOT_IN_V2 or self.model_type == "deepseek_v3"]
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
PRESETS["deepseek-v3.2"] = PRESETS["deepseek-v3"].replace(
    model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
_YARN_V4 = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}


def _v4_preset(*, layers: int, hidden: int, heads: int, q_lora: int, o_groups: int, experts: int, inter: int,
               scaling: float, index_topk: int, ratios: tuple[int, ...]) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=hidden, moe_intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="noaux_tc",
        scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=scaling, first_k_dense_replace=0,
        q_lora_rank=q_lora, qk_rope_head_dim=64, head_dim=512, o_groups=o_groups, o_lora_rank=1024,
        sliding_window=128, compress_ratios=ratios, compress_rope_theta=160000.0, index_n_heads=64,
        index_head_dim=128, index_topk=index_topk, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_hash_layers=3,
        swiglu_limit=10.0, max_position_embeddings=1048576, rope_theta=10000.0, rope_scaling=_YARN_V4,
        rope_layout="rope_scaling", config_form="hub", bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1)


# CPU-sized, V4-style: one layer of each attention kind (window only, CSA, HCA at rate 16), a hash-routed first layer
PRESETS["tiny-v4"] = ModelConfig(
    model_type="deepseek_v4", vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sqrtsoftplus", norm_topk_prob=True,
    routed_scaling_factor=1.5, first_k_dense_replace=0, q_lora_rank=48, qk_rope_head_dim=8, head_dim=32, o_groups=2,
    o_lora_rank=32, sliding_window=32, compress_ratios=(0, 4, 16, 4), index_n_heads=16, index_head_dim=16,
    index_topk=16, hc_mult=4, num_hash_layers=1, swiglu_limit=10.0, max_position_embeddings=1024,
    rope_layout="rope_scaling", config_form="hub")

# compress_ratios as published: Flash 2 window-only layers, then CSA/HCA alternating; Pro 2 HCA, then the same
PRESETS["deepseek-v4-flash"] = _v4_preset(
    layers=43, hidden=4096, heads=64, q_lora=1024, o_groups=8, experts=256, inter=2048, scaling=1.5, index_topk=512,
    ratios=(0, 0, *(4 if i % 2 == 0 else 128 for i in range(2, 43))))
PRESETS["deepseek-v4-pro"] = _v4_preset(
    layers=61, hidden=7168, heads=128, q_lora=1536, o_groups=16, experts=384, inter=3072, scaling=2.5,
    index_topk=1024, ratios=(128, 128, *(4 if i % 2 == 0 else 128 for i in range(2, 61))))
