"""DeepSeek-V4's two config.json forms and the fields they map to.

- transformers' form: `layer_types` + `compress_rates` (one CSA and one HCA rate), `mlp_layer_types`, nested
  `rope_parameters` {main, compress};
- DeepSeek's hub form: per-layer numeric `compress_ratios` with the MTP entries last, `num_hash_layers`, top-level
  `rope_theta` / `rope_scaling` (transformers' `compress_rate_hca` override honoured).
Both are read into `ModelConfig` fields plus the extras that let `to_hf_dict` write the form back exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workbench.config.names import CSA, CSA_RATIO, HCA, INDEX_FIELDS, SLIDING, ConfigError, rope_type

if TYPE_CHECKING:
    from workbench.config.model import ModelConfig

# V4's config.json keys that map 1:1 onto fields, in both forms (the layer pattern and rope are handled apart)
V4_FIELDS = (
    "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "topk_method",
    "scoring_func", "norm_topk_prob", "routed_scaling_factor", "q_lora_rank", "qk_rope_head_dim",
    "max_position_embeddings", "rms_norm_eps", "hidden_act", "attention_bias", "tie_word_embeddings",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "num_nextn_predict_layers",
    *INDEX_FIELDS, "head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rope_theta", "hc_mult",
    "hc_sinkhorn_iters", "hc_eps", "swiglu_limit", "num_hash_layers",
)
_V4_TF_DEFAULT_HASH_LAYERS = 3  # transformers' mlp_layer_types default


def v4_from_hf(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields, extras) of a V4 config.json, in DeepSeek's hub form (`compress_ratios` per layer + MTP entries,
    `num_hash_layers`, top-level rope_theta/rope_scaling) or transformers' form (`layer_types`, `compress_rates`,
    `mlp_layer_types`, nested `rope_parameters` {main, compress})."""
    kw: dict[str, Any] = {"model_type": "deepseek_v4", "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
                          "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc"}
    extra: dict[str, Any] = {}
    present: list[str] = []
    handled = ("model_type", "compress_ratios", "layer_types", "compress_rates", "mlp_layer_types",
               "rope_parameters", "rope_scaling", "rope_theta")
    for key, value in d.items():
        if key in V4_FIELDS:
            kw[key] = value
            present.append(key)
        elif key not in handled:
            extra[key] = value
    L = int(kw.get("num_hidden_layers", 0))
    if "qk_rope_head_dim" not in kw and d.get("partial_rotary_factor") and kw.get("head_dim"):
        kw["qk_rope_head_dim"] = round(float(d["partial_rotary_factor"]) * int(kw["head_dim"]))
    if "compress_ratios" in d:  # DeepSeek's hub form
        ratios = list(d["compress_ratios"])
        if len(ratios) < L:
            raise ConfigError(f"config.json: compress_ratios has {len(ratios)} entries for num_hidden_layers={L}")
        # transformers' overrides: with compress_rate_hca the label 128 means that rate (compress_rate_csa must be 4)
        if d.get("compress_rate_csa") not in (None, CSA_RATIO):
            raise ConfigError(f"config.json: compress_rate_csa={d['compress_rate_csa']}: CSA layers compress by "
                              f"{CSA_RATIO} (DeepSeek's code tells CSA from HCA by that ratio)")
        hca_rate = d.get("compress_rate_hca")
        if hca_rate is not None:
            if int(hca_rate) in (0, CSA_RATIO):
                raise ConfigError(f"config.json: compress_rate_hca={hca_rate} must be > 0 and not {CSA_RATIO}")
            ratios = [int(hca_rate) if r == 128 else r for r in ratios]
        kw["compress_ratios"] = tuple(ratios[:L])
        extra["__mtp_compress_ratios__"] = ratios[L:]
        kw["config_form"], kw["rope_layout"] = "hub", "rope_scaling"
        kw["rope_theta"] = float(d.get("rope_theta", 10000.0))
        kw["rope_scaling"] = d.get("rope_scaling")
        for key in ("rope_theta", "rope_scaling"):
            if key not in d:
                extra[f"__no_{key}_key__"] = True
    else:  # transformers' form
        layer_types = d.get("layer_types")
        if layer_types is None:
            raise ConfigError("config.json: deepseek_v4 needs compress_ratios (DeepSeek's form) or layer_types "
                              "(transformers' form) to say which layers compress")
        rates = dict(d.get("compress_rates") or {CSA: CSA_RATIO, HCA: 128})
        if int(rates.get(CSA, CSA_RATIO)) != CSA_RATIO:
            raise ConfigError(f"config.json: compress_rates[{CSA!r}]={rates[CSA]}: CSA layers compress by "
                              f"{CSA_RATIO} (DeepSeek's code tells CSA from HCA by that ratio)")
        if int(rates.get(HCA, 128)) in (0, CSA_RATIO):
            raise ConfigError(f"config.json: compress_rates[{HCA!r}]={rates[HCA]} must be > 0 and not {CSA_RATIO}")
        ratios = []
        for i, kind in enumerate(layer_types):
            if kind not in (SLIDING, CSA, HCA):
                raise ConfigError(f"config.json: layer_types[{i}]={kind!r} is not one of {SLIDING}, {CSA}, {HCA}")
            ratios.append(0 if kind == SLIDING else int(rates.get(kind, CSA_RATIO if kind == CSA else 128)))
        kw["compress_ratios"] = tuple(ratios)
        extra["__compress_rates__"] = rates
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is None:
            kw["num_hash_layers"] = min(_V4_TF_DEFAULT_HASH_LAYERS, L)
            extra["__no_mlp_layer_types_key__"] = True
        else:
            n_hash = sum(1 for t in mlp_types if t == "hash_moe")
            if list(mlp_types) != ["hash_moe"] * n_hash + ["moe"] * (len(mlp_types) - n_hash):
                raise ConfigError(f"config.json: mlp_layer_types {list(mlp_types)} must be hash_moe layers first, "
                                  "then moe (DeepSeek hash-routes the first num_hash_layers layers)")
            kw["num_hash_layers"] = n_hash
        kw["config_form"], kw["rope_layout"] = "hf", "rope_parameters"
        rp = d.get("rope_parameters")
        if rp is not None:
            if not (isinstance(rp, Mapping) and "main" in rp and "compress" in rp):
                raise ConfigError("config.json: deepseek_v4 rope_parameters must hold 'main' and 'compress' tables")
            main, compress = dict(rp["main"]), dict(rp["compress"])
            kw["rope_theta"] = float(main.pop("rope_theta", d.get("rope_theta", 10000.0)))
            kw["compress_rope_theta"] = float(compress.pop("rope_theta", kw.get("compress_rope_theta", 160000.0)))
            extra["__rope_main__"] = main
            extra["__rope_compress_keys__"] = sorted(k for k in ("partial_rotary_factor", "attention_factor")
                                                     if k in compress)
            for key in ("partial_rotary_factor", "attention_factor"):
                compress.pop(key, None)
            kw["rope_scaling"] = compress
        else:
            kw["rope_theta"] = float(d.get("rope_theta", 10000.0))
            kw["rope_scaling"] = d.get("rope_scaling")
            extra["__no_rope_parameters_key__"] = True
        for key in ("rope_theta", "rope_scaling"):
            if key in d:
                extra[key] = d[key]
    extra["__present__"] = present
    return kw, extra


def v4_to_hf(c: ModelConfig) -> dict[str, Any]:
    extra = dict(c.hf_extra)
    present = extra.pop("__present__", None)
    out: dict[str, Any] = {"model_type": c.model_type}
    keys = present if present is not None else [
        k for k in V4_FIELDS if not (c.config_form == "hf" and k == "num_hash_layers")]
    for key in keys:
        value = getattr(c, key)
        out[key] = dict(value) if isinstance(value, Mapping) else value
    if present is None:
        out["architectures"] = [c.architecture]
    L = c.num_hidden_layers
    mtp = extra.pop("__mtp_compress_ratios__", [0] * c.num_nextn_predict_layers)  # read from the hub form, if so
    if c.config_form == "hub":
        ratios = list(c.compress_ratios)
        if extra.get("compress_rate_hca") is not None:  # written as transformers' label 128 + the override
            hca = {m for m in ratios if m not in (0, CSA_RATIO)}
            if len(hca) > 1:
                raise ConfigError(f"compress_ratios {ratios}: compress_rate_hca gives all HCA layers one rate")
            if hca:
                extra["compress_rate_hca"] = hca.pop()
            ratios = [128 if m not in (0, CSA_RATIO) else m for m in ratios]
        out["compress_ratios"] = ratios + list(mtp)
        if not extra.pop("__no_rope_theta_key__", False):
            out["rope_theta"] = c.rope_theta
        if not extra.pop("__no_rope_scaling_key__", False):
            out["rope_scaling"] = dict(c.rope_scaling) if c.rope_scaling is not None else None
        return {**out, **extra}
    rates = dict(extra.pop("__compress_rates__", {CSA: CSA_RATIO, HCA: 128}))
    hca = {m for m in c.compress_ratios if m not in (0, CSA_RATIO)}
    if len(hca) > 1:
        raise ConfigError(f"compress_ratios {list(c.compress_ratios)}: transformers' form has one HCA rate; "
                          "write this config with config_form='hub'")
    if hca:
        rates[HCA] = hca.pop()
    out["layer_types"] = [c.attention_kind(i) for i in range(L)]
    out["compress_rates"] = rates
    if not extra.pop("__no_mlp_layer_types_key__", False) or c.num_hash_layers != min(_V4_TF_DEFAULT_HASH_LAYERS, L):
        out["mlp_layer_types"] = ["hash_moe"] * c.num_hash_layers + ["moe"] * (L - c.num_hash_layers)
    main = dict(extra.pop("__rope_main__", {"partial_rotary_factor": c.qk_rope_head_dim / c.head_dim,
                                            "rope_type": "default"}))
    compress_keys = extra.pop("__rope_compress_keys__", ["attention_factor", "partial_rotary_factor"])
    if not extra.pop("__no_rope_parameters_key__", False):
        compress = dict(c.rope_scaling or {"rope_type": "default"})
        compress["rope_theta"] = c.compress_rope_theta
        if "partial_rotary_factor" in compress_keys:
            compress["partial_rotary_factor"] = c.qk_rope_head_dim / c.head_dim
        if "attention_factor" in compress_keys and rope_type(compress) == "yarn":
            compress["attention_factor"] = 1.0
        out["rope_parameters"] = {"main": {**main, "rope_theta": c.rope_theta}, "compress": compress}
        if "rope_theta" in extra:  # transformers also writes the main base at the top level
            extra["rope_theta"] = c.rope_theta
    else:
        out["rope_theta"] = c.rope_theta
        out["rope_scaling"] = dict(c.rope_scaling) if c.rope_scaling is not None else None
    return {**out, **extra}
