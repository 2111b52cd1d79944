"""Checkpoint layouts: which spelling a checkpoint's tensor names use, and the tables between each and ours.

Our names are transformers' in-memory names minus `model.`, routed experts stacked ([E, N, K] under
`layers.N.mlp.experts.{gate_proj,up_proj,down_proj}`). On disk a checkpoint spells them one of three ways:
- "hf": what transformers' `save_pretrained` writes. V2/V3/V3.2: `model.` + ours, one tensor per expert
  (`model.layers.3.mlp.experts.7.gate_proj.weight`). V4 (transformers 5.24): `model.` + DeepSeek's leaf names
  (`model.layers.3.attn.wq_a.weight`, `model.layers.3.ffn.experts.7.w1.weight`, `model.layers.3.attn.norm.weight`),
  but `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_fn` and `head.weight` at the top.
- "hub": DeepSeek's released V4 checkpoints (and REF4's `convert.py`): no prefix, `embed.weight`, `head.weight`,
  `hc_head_fn`, `layers.3.attn.kv_norm.weight`, FP8/FP4 scales as `<stem>.scale`, MTP as `mtp.0.*`.
- "internal": V4 under transformers' in-memory names (`model.layers.3.self_attn.q_a_proj.weight`, `lm_head.weight`),
  experts per expert as V3's, or fused as transformers holds them (`mlp.experts.gate_up_proj` [E, 2I, D]).
  For V2/V3/V3.2 it is the "hf" layout, so they are always reported as "hf".
Reading accepts both spellings of the main attention's kv norm in every V4 layout (`attn.kv_norm`, as REF4 names
the module and the released files store it, and `attn.norm`, what transformers 5.24 writes; its loader takes both)
and both scale spellings (`.scale`, `.weight_scale_inv`). Which spelling was read is remembered per tensor, so a
checkpoint is written back under its own names (`workbench.checkpoint.save`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from workbench.config import ModelConfig

CheckpointLayout = Literal["hf", "hub", "internal"]
LAYOUTS: tuple[CheckpointLayout, ...] = ("hf", "hub", "internal")

EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYER_RE = re.compile(r"^layers\.(\d+)\.")
MTP_RE = re.compile(r"^mtp\.(\d+)\.")  # DeepSeek's V4 multi-token-prediction modules (hub layout)
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")  # DeepSeek-V4's, and DeepSeek-V3's / transformers'

# V4, under `layers.N.`: (ours, DeepSeek's leaf name). The first spelling of a DeepSeek name is the one written.
_V4_LAYER: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    *((f"{ours}.{leaf}", f"{hub}_{leaf}") for ours, hub in (("attn_hc", "hc_attn"), ("ffn_hc", "hc_ffn"))
      for leaf in ("fn", "base", "scale")),
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("self_attn.kv_norm.weight", "attn.norm.weight"),  # transformers' save_pretrained spelling
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    *((f"self_attn.compressor.{ours}", f"attn.{hub}.{leaf}")
      for ours_prefix, hub in (("", "compressor"), ("indexer.", "indexer.compressor"))
      for ours, leaf in ((f"{ours_prefix}kv_proj.weight", "wkv.weight"), (f"{ours_prefix}gate_proj.weight", "wgate.weight"),
                         (f"{ours_prefix}position_bias", "ape"), (f"{ours_prefix}kv_norm.weight", "norm.weight"))),
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
)
_V4_EXPERT_PROJS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_V4_HUB_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
# top-level tensors: ours -> (hub, hf)
_V4_TOP = {
    "embed_tokens.weight": ("embed.weight", "model.embed_tokens.weight"),
    "norm.weight": ("norm.weight", "model.norm.weight"),
    "lm_head.weight": ("head.weight", "head.weight"),
    **{f"hc_head.hc_{leaf}": (f"hc_head_{leaf}", f"model.hc_head.hc_{leaf}") for leaf in ("fn", "base", "scale")},
}
_HUB_TO_OURS_LAYER = {hub: ours for ours, hub in reversed(_V4_LAYER)}
_OURS_TO_HUB_LAYER = dict(_V4_LAYER) | {"self_attn.kv_norm.weight": "attn.kv_norm.weight"}
_OURS_TO_HF_LAYER = _OURS_TO_HUB_LAYER | {"self_attn.kv_norm.weight": "attn.norm.weight"}
_HUB_TOP = {hub: ours for ours, (hub, _) in _V4_TOP.items()}
_HF_TOP = {hf: ours for ours, (_, hf) in _V4_TOP.items()}

# the names that give a V4 layout away (head.weight, model.embed_tokens, model.norm, model.hc_head are in two)
_HUB_SIGNS = re.compile(r"^(layers\.\d+\.|mtp\.\d+\.|embed\.weight$|norm\.weight$|hc_head_)")
_HF_SIGNS = re.compile(r"^model\.layers\.\d+\.(attn\.|ffn\.|attn_norm\.|ffn_norm\.|hc_attn_|hc_ffn_)")
_INTERNAL_SIGNS = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp|input_layernorm|post_attention_layernorm|attn_hc|"
                             r"ffn_hc)\.|lm_head\.weight$)")


# kept fp32 under a load or save dtype: the router and V3's balancing bias (as DeepSeek keeps them), V4's mHC
# mixing weights, attention sinks and compressor position biases (transformers keeps them fp32, the files store them so)
_KEPT_FP32 = re.compile(r"(mlp\.gate\.weight|e_score_correction_bias|(attn_hc|ffn_hc|hc_head)\.\w+|self_attn\.sinks|"
                        r"position_bias)$")


def kept_in_fp32(ours: str) -> bool:
    """Whether our tensor `ours` stays fp32 when a model is loaded or saved in a lower `dtype`."""
    return _KEPT_FP32.search(ours) is not None


class LayoutError(ValueError):
    """Tensor names that fit no layout, or more than one."""


@dataclass(frozen=True)
class StoredName:
    """What one stored tensor is in our terms."""

    ours: str  # our parameter name: stacked experts as `layers.N.mlp.experts.gate_proj`; MTP tensors keep `mtp.K.*`
    expert: int | None = None  # the expert of a per-expert tensor
    scale: bool = False  # a quantization scale (FP8 block or FP4 group) of the weight `ours`


def detect_layout(names: Iterable[str], config: ModelConfig) -> CheckpointLayout:
    """The layout of a checkpoint with these tensor names: "hf" for V2/V3/V3.2; for V4 whichever of "hub", "hf",
    "internal" the names show, LayoutError when they show none or mix two (a name of each is quoted)."""
    if not config.is_v4:
        return "hf"
    seen: dict[CheckpointLayout, str] = {}
    for name in names:
        for layout, signs in (("hub", _HUB_SIGNS), ("hf", _HF_SIGNS), ("internal", _INTERNAL_SIGNS)):
            if layout not in seen and signs.match(name):
                seen[layout] = name  # type: ignore[index]
    if len(seen) == 1:
        return next(iter(seen))
    if not seen:
        raise LayoutError("no tensor name of a deepseek_v4 checkpoint in any layout (hub: layers.N.attn.wq_a.weight, "
                          "hf: model.layers.N.attn.wq_a.weight, internal: model.layers.N.self_attn.q_a_proj.weight)")
    mixed = ", ".join(f"{layout} ({name})" for layout, name in seen.items())
    raise LayoutError(f"tensor names mix layouts: {mixed}; a checkpoint is written in one")


def stored_to_ours(name: str, layout: CheckpointLayout, is_v4: bool, weights: frozenset[str] | set[str] = frozenset()
                   ) -> StoredName | None:
    """Map one stored name (None: no tensor of ours has it). `weights`, the checkpoint's names, tells a scale
    `<stem>.scale` from a parameter that ends in `.scale` (internal V4's `attn_hc.scale`)."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix) and (suffix == ".weight_scale_inv" or name[: -len(suffix)] + ".weight" in weights):
            weight = stored_to_ours(name[: -len(suffix)] + ".weight", layout, is_v4)
            return None if weight is None else StoredName(weight.ours, weight.expert, scale=True)
    if not is_v4 or layout == "internal":
        return _ours_with_expert(name[len("model."):] if name.startswith("model.") else name)
    top = (_HUB_TOP if layout == "hub" else _HF_TOP).get(name)
    if top is not None:
        return StoredName(top)
    bare = name if layout == "hub" else name.removeprefix("model.")
    if layout == "hf" and not name.startswith("model.layers."):
        return None
    if MTP_RE.match(bare):
        return StoredName(bare) if layout == "hub" else None
    expert = _V4_HUB_EXPERT_RE.match(bare)
    if expert:
        layer, e, w = expert.groups()
        return StoredName(f"layers.{layer}.mlp.experts.{_V4_EXPERT_PROJS[w]}", int(e))
    layer_match = LAYER_RE.match(bare)
    if layer_match is None:
        return None
    leaf = _HUB_TO_OURS_LAYER.get(bare[layer_match.end():])
    return None if leaf is None else StoredName(f"layers.{layer_match.group(1)}.{leaf}")


def ours_to_stored(ours: str, layout: CheckpointLayout, is_v4: bool, expert: int | None = None) -> str:
    """Our name (and expert, for stacked experts) as this layout writes it; KeyError for a name it has no place for."""
    if not is_v4 or layout == "internal":
        if expert is not None:
            layer, proj = ours.split(".")[1], ours.rsplit(".", 1)[1]
            return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        return ours if ours.startswith("lm_head.") else f"model.{ours}"
    prefix = "" if layout == "hub" else "model."
    if expert is not None:
        layer, proj = ours.split(".")[1], ours.rsplit(".", 1)[1]
        w = next(k for k, v in _V4_EXPERT_PROJS.items() if v == proj)
        return f"{prefix}layers.{layer}.ffn.experts.{expert}.{w}.weight"
    if ours in _V4_TOP:
        return _V4_TOP[ours][0 if layout == "hub" else 1]
    m = LAYER_RE.match(ours)
    if m is None:
        raise KeyError(f"{ours}: no {layout} name for it")
    leaves = _OURS_TO_HUB_LAYER if layout == "hub" else _OURS_TO_HF_LAYER
    return f"{prefix}layers.{m.group(1)}.{leaves[ours[m.end():]]}"


def scale_name(weight_name: str, layout: CheckpointLayout) -> str:
    """Where a layout stores the scale of the stored weight `weight_name` (`X.weight` -> `X.scale` in the hub)."""
    stem = weight_name.removesuffix(".weight")
    return f"{stem}.scale" if layout == "hub" else f"{stem}.weight_scale_inv"


def _ours_with_expert(ours: str) -> StoredName:
    e = EXPERT_RE.match(ours)
    if e:
        return StoredName(f"layers.{e.group(1)}.mlp.experts.{e.group(3)}", int(e.group(2)))
    return StoredName(ours)
