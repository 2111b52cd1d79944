"""Sparse-attention controls: per layer, the indexer's budget, dense attention, V4's window and compressed branch.

Design choices:
- `AttentionControl` is a plain frozen dataclass like `RoutingControl`: None keeps the model's setting, a layer's
  entry is merged over the "all" entry field by field.
- A field applies only to layers that have the part it changes (`applies`): `index_topk` and `dense` to layers with
  a lightning indexer (every DeepSeek-V3.2 layer, V4's CSA layers), `sliding_window` and `window` to every V4 layer,
  `compressed` to V4's CSA and HCA layers. An "all" entry sets a field wherever it applies; a layer's own entry that
  sets a field its layer lacks is refused, naming the layer, its kind and the field.
- "Dense" means what the indexer would choose from, all of it: for V3.2 every causal key (exactly DeepSeek-V3's
  MLA), for V4 every visible compressed entry (as an HCA layer reads them), to see what sparsity costs.
- The window can shrink, not grow: the V4 cache's ring holds the config's sliding_window - 1 past keys, so a longer
  window could not be served token by token.

Shape legend: none (no tensors here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

from workbench.config import CSA, CSA_RATIO, SLIDING, ModelConfig
from workbench.controls.keys import ControlError, _from_fields, _need_type

INDEXER_FIELDS = ("index_topk", "dense")
WINDOW_FIELDS = ("sliding_window", "window")


@dataclasses.dataclass(frozen=True)
class AttentionControl:
    """Attention overrides for one layer (or all of them); None keeps the model's own setting."""

    index_topk: int | None = None  # keys (V3.2) or compressed entries (V4 CSA) the indexer keeps per query
    dense: bool | None = None  # True: no indexer choice, every causal key (V3.2) / visible entry (V4 CSA)
    sliding_window: int | None = None  # V4: window keys per query, self included, 1..the config's sliding_window
    window: bool | None = None  # V4: False drops the sliding-window keys
    compressed: bool | None = None  # V4 CSA/HCA: False drops the compressed entries

    def __post_init__(self) -> None:
        for name in ("index_topk", "sliding_window"):
            _need_type(self, name, int)
        for name in ("dense", "window", "compressed"):
            _need_type(self, name, bool)

    def set_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def merged_over(self, base: AttentionControl | None) -> AttentionControl:
        """This control's set fields over `base`'s (a layer's entry over the "all" entry)."""
        if base is None:
            return self
        return dataclasses.replace(base, **{name: getattr(self, name) for name in self.set_fields()})

    def only(self, names: tuple[str, ...]) -> AttentionControl | None:
        """The control with just the fields in `names` (None when none of them is set)."""
        kept = {name: getattr(self, name) for name in self.set_fields() if name in names}
        return AttentionControl(**kept) if kept else None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.set_fields()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "attention control") -> AttentionControl:
        """From JSON's object of fields; `where` (e.g. "attention[2]") starts every message."""
        return cast("AttentionControl", _from_fields(cls, d, where, "an object of attention fields"))


def has_indexer(config: ModelConfig, layer: int) -> bool:
    """Whether the layer's attention runs a lightning indexer (V3.2: every layer; V4: CSA layers)."""
    if config.is_v4:
        return config.attention_kind(layer) == CSA
    return config.model_type == "deepseek_v32"


def applies(config: ModelConfig, layer: int) -> tuple[str, ...]:
    """The attention fields that can change `layer` of this config."""
    out: tuple[str, ...] = INDEXER_FIELDS if has_indexer(config, layer) else ()
    if config.is_v4:
        out += WINDOW_FIELDS
        if config.attention_kind(layer) != SLIDING:
            out += ("compressed",)
    return out


def layer_kind(config: ModelConfig, layer: int) -> str:
    if config.is_v4:
        return f"a deepseek_v4 {config.attention_kind(layer)} layer"
    return f"a {config.model_type} layer ({'indexed MLA' if has_indexer(config, layer) else 'dense MLA'})"


def check_attention(ac: AttentionControl, config: ModelConfig, layer: int) -> None:
    """Raise ControlError naming the layer and field unless `layer` can run `ac` (already merged and filtered)."""
    where = f"attention for layer {layer}"

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ControlError(f"{where}: {msg}")

    if ac.index_topk is not None:
        most = config.max_position_embeddings // (CSA_RATIO if config.is_v4 else 1)
        what = "compressed entries" if config.is_v4 else "keys"
        need(1 <= ac.index_topk <= most, f"index_topk={ac.index_topk} must be in 1..{most} (the most {what} a "
                                         f"query can see at max_position_embeddings={config.max_position_embeddings})")
        need(not ac.dense, "index_topk and dense=True both set: dense attention has no budget")
    if ac.sliding_window is not None:
        W = config.sliding_window
        need(1 <= ac.sliding_window <= W, f"sliding_window={ac.sliding_window} must be in 1..{W} (the cache's ring "
                                          f"holds the config's sliding_window - 1 past keys)")
        need(ac.window is not False, "sliding_window set while window=False drops the window")
    if ac.compressed is False:
        need(not ac.dense and ac.index_topk is None,
             "compressed=False drops the compressed entries the indexer chooses from: index_topk/dense do not apply")


def check_own_fields(ac: AttentionControl, config: ModelConfig, layer: int) -> None:
    """A layer's own entry may set only fields its layer has."""
    lacking = [name for name in ac.set_fields() if name not in applies(config, layer)]
    if lacking:
        raise ControlError(f"attention[{layer}]: layer {layer} is {layer_kind(config, layer)}, which has no "
                           f"{_part(lacking[0])} for {lacking} (it takes {list(applies(config, layer)) or 'none'})")


def _part(name: str) -> str:
    if name in INDEXER_FIELDS:
        return "lightning indexer"
    if name in WINDOW_FIELDS:
        return "sliding window"
    return "compressed branch"
