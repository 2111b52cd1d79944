"""`Controls`: every intervention of one run, validated against a config, resolved for the model, saved as JSON.

Design choices:
- One frozen dataclass of per-layer mappings (routing, latent, fp8; for V3.2/V4 attention, tid2eid, mhc_identity,
  swiglu_limit) and an optional routing replay; keys are checked and ordered ("all" first) on construction, so
  controls built in Python and loaded from JSON compare equal. Sections left empty are left out of the JSON, so a
  V2/V3 set of controls reads as it always did.
- `validate(config)` rejects impossible settings (unknown or dense layer, top-k 0 or above the experts left after
  ablation, forced experts that are also ablated, rank above the latent width, ...) with a message that names the
  layer and field, before anything runs; `resolve()` then turns them into the model's `LayerControls`.
- `first_difference` compares the effective controls layer by layer, so a re-run can start at the first layer a change
  touches.

Shape legend: C kv_lora_rank.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from workbench.config import ModelConfig
from workbench.controls.attention import AttentionControl, applies, check_attention, check_own_fields
from workbench.controls.fp8_sites import _fp8_expand, _frozen_fp8, fp8_layer_sites
from workbench.controls.hash_table import Rows, check_tid2eid, frozen_tid2eid, hash_rows, rows_for
from workbench.controls.keys import ControlError, LayerKey, _layer_key, _need_mapping
from workbench.controls.latent import LatentBasis, LatentControl, _latent_basis
from workbench.controls.replay import RoutingReplay, _check_replay
from workbench.controls.routing import FP32_MAX, RoutingControl, _check_routing, _fits_fp32, _route_override
from workbench.model.block import LayerControls
from workbench.model.fp8 import SITE_GROUPS
from workbench.model.routing import RoutingParams

if TYPE_CHECKING:
    import xarray as xr


@dataclasses.dataclass(frozen=True)
class Controls:
    """Every intervention of one run. `Controls()` is the baseline."""

    routing: Mapping[LayerKey, RoutingControl] = dataclasses.field(default_factory=dict)
    latent: Mapping[LayerKey, LatentControl] = dataclasses.field(default_factory=dict)
    # layer or "all" -> the sites computing in FP8 there ("all", or names/groups from workbench.model.fp8.SITES)
    fp8: Mapping[LayerKey, Sequence[str] | str] = dataclasses.field(default_factory=dict)
    routing_replay: RoutingReplay | None = None
    # sparse attention per layer (V3.2, V4): the indexer's budget, dense attention, V4's window and compressed branch
    attention: Mapping[LayerKey, AttentionControl] = dataclasses.field(default_factory=dict)
    # V4 hash-routed layers: {layer or "all": {token id: [experts]}} rows replacing the checkpoint's tid2eid
    tid2eid: Mapping[LayerKey, Rows] = dataclasses.field(default_factory=dict)
    # V4: True replaces the layer's mHC mixing matrices (both sublayers) by the identity
    mhc_identity: Mapping[LayerKey, bool] = dataclasses.field(default_factory=dict)
    # V4: the SwiGLU clamp of routed and shared experts (> 0; a large value all but removes it)
    swiglu_limit: Mapping[LayerKey, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", _frozen_by_layer(self.routing, "routing"))
        object.__setattr__(self, "latent", _frozen_by_layer(self.latent, "latent"))
        object.__setattr__(self, "fp8", _frozen_fp8(self.fp8))
        object.__setattr__(self, "attention", _frozen_by_layer(self.attention, "attention"))
        object.__setattr__(self, "tid2eid", frozen_tid2eid(self.tid2eid))
        object.__setattr__(self, "mhc_identity", _frozen_values(self.mhc_identity, "mhc_identity", _as_bool))
        object.__setattr__(self, "swiglu_limit", _frozen_values(self.swiglu_limit, "swiglu_limit", _as_limit))
        if self.routing_replay is not None and not isinstance(self.routing_replay, RoutingReplay):
            raise ControlError(f"routing_replay must be a RoutingReplay, got {type(self.routing_replay).__name__}")

    @classmethod
    def replay(cls, trace: str | Path | xr.Dataset, seq: int = 0, layers: Iterable[int] | None = None,
               **others: Any) -> Controls:
        """Controls that force the routing recorded for `seq` in a trace store or Dataset (see RoutingReplay)."""
        return cls(routing_replay=RoutingReplay.from_trace(trace, seq, layers), **others)

    # ------------------------------------------------------------------ short forms
    # One line for the common interventions; combine them with `|` (the right side wins field by field).
    @classmethod
    def ablate(cls, experts: Mapping[LayerKey, Iterable[int]] | Iterable[int]) -> Controls:
        """`Controls.ablate({2: [3]})`: expert 3 of layer 2 is never chosen; a bare list ablates in every MoE layer."""
        return cls(routing={k: RoutingControl(ablate=tuple(v)) for k, v in _per_layer(experts, "ablate").items()})

    @classmethod
    def force(cls, experts: Mapping[LayerKey, Iterable[int]] | Iterable[int]) -> Controls:
        """`Controls.force({2: [5]})`: expert 5 takes the first slot of every token in layer 2 (a list: every layer)."""
        return cls(routing={k: RoutingControl(force=tuple(v)) for k, v in _per_layer(experts, "force").items()})

    @classmethod
    def top_k(cls, k: int, layers: Iterable[int] | LayerKey = "all") -> Controls:
        """`Controls.top_k(2)`: two experts per token in every MoE layer (or in `layers`)."""
        return cls(routing={layer: RoutingControl(top_k=k) for layer in _layers(layers)})

    @classmethod
    def bias(cls, offsets: Mapping[LayerKey, Mapping[int, float]]) -> Controls:
        """`Controls.bias({2: {3: 0.5}})`: +0.5 on expert 3's selection score in layer 2 (its weight is unchanged)."""
        offsets = _need_mapping(offsets, "Controls.bias", "a mapping {layer: {expert: offset}}")
        return cls(routing={k: RoutingControl(bias_offset=v) for k, v in offsets.items()})

    @classmethod
    def latent_rank(cls, rank: int, layers: Iterable[int] | LayerKey = "all", basis: LatentBasis = "svd") -> Controls:
        """`Controls.latent_rank(64)`: keep `rank` directions of the KV latent in every layer (or in `layers`)."""
        return cls(latent={layer: LatentControl(rank, basis) for layer in _layers(layers)})

    @classmethod
    def index_topk(cls, k: int, layers: Iterable[int] | LayerKey = "all") -> Controls:
        """`Controls.index_topk(4)`: the lightning indexer keeps 4 keys / compressed entries per query."""
        return cls(attention={layer: AttentionControl(index_topk=k) for layer in _layers(layers)})

    @classmethod
    def dense_attention(cls, layers: Iterable[int] | LayerKey = "all") -> Controls:
        """`Controls.dense_attention()`: no indexer choice (V3.2: every causal key; V4: every visible entry)."""
        return cls(attention={layer: AttentionControl(dense=True) for layer in _layers(layers)})

    @classmethod
    def sliding_window(cls, window: int, layers: Iterable[int] | LayerKey = "all") -> Controls:
        """`Controls.sliding_window(8)`: V4 queries read their last 8 tokens (self included) in the window branch."""
        return cls(attention={layer: AttentionControl(sliding_window=window) for layer in _layers(layers)})

    def __or__(self, other: Controls) -> Controls:
        """Both sets of controls; where both set a field of one layer, `other`'s value wins."""
        if not isinstance(other, Controls):
            return NotImplemented
        routing = dict(self.routing)
        for key, rc in other.routing.items():
            routing[key] = rc.merged_over(routing.get(key))
        attention = dict(self.attention)
        for key, ac in other.attention.items():
            attention[key] = ac.merged_over(attention.get(key))
        tid2eid = {key: {**self.tid2eid.get(key, {}), **other.tid2eid.get(key, {})}
                   for key in {**self.tid2eid, **other.tid2eid}}
        return Controls(routing=routing, latent={**self.latent, **other.latent}, fp8={**self.fp8, **other.fp8},
                        routing_replay=other.routing_replay or self.routing_replay, attention=attention,
                        tid2eid=tid2eid, mhc_identity={**self.mhc_identity, **other.mhc_identity},
                        swiglu_limit={**self.swiglu_limit, **other.swiglu_limit})

    # ------------------------------------------------------------------ per layer
    def routing_for(self, layer: int, config: ModelConfig | None = None) -> RoutingControl | None:
        """The layer's own entry over the "all" entry; with `config`, a hash-routed layer gets only the "all"
        fields it can apply (`RoutingControl.for_hash_layer`), so `Controls.top_k(2)` means every learned layer."""
        everywhere, own = self.routing.get("all"), self.routing.get(layer)
        if everywhere is not None and config is not None and config.is_hash_layer(layer):
            everywhere = everywhere.for_hash_layer()
        return own.merged_over(everywhere) if own is not None else everywhere

    def latent_for(self, layer: int) -> LatentControl | None:
        own = self.latent.get(layer)
        return own if own is not None else self.latent.get("all")

    def fp8_for(self, layer: int) -> tuple[str, ...] | None:
        """The sites this run asks to compute in FP8 in `layer` (None: as the model is)."""
        own = self.fp8.get(layer)
        return tuple(own) if own is not None else (tuple(self.fp8["all"]) if "all" in self.fp8 else None)

    def attention_for(self, layer: int, config: ModelConfig) -> AttentionControl | None:
        """The layer's own entry over the "all" entry's fields that apply to this layer (None: as the model is)."""
        everywhere, own = self.attention.get("all"), self.attention.get(layer)
        base = everywhere.only(applies(config, layer)) if everywhere is not None else None
        return own.merged_over(base) if own is not None else base

    def tid2eid_for(self, layer: int) -> Rows:
        return rows_for(self.tid2eid, layer)

    def mhc_identity_for(self, layer: int) -> bool:
        own = self.mhc_identity.get(layer)
        return own if own is not None else self.mhc_identity.get("all", False)

    def swiglu_limit_for(self, layer: int) -> float | None:
        own = self.swiglu_limit.get(layer)
        return own if own is not None else self.swiglu_limit.get("all")

    def _v4_for(self, layer: int, config: ModelConfig) -> tuple[Any, ...]:
        """What the V3.2/V4 sections set for `layer`, comparable with ==."""
        return (self.attention_for(layer, config), self.tid2eid_for(layer), self.mhc_identity_for(layer),
                self.swiglu_limit_for(layer))

    def replayed(self, layer: int) -> bool:
        return self.routing_replay is not None and layer in self.routing_replay.expert_ids

    def first_difference(self, other: Controls, config: ModelConfig) -> int:
        """The first layer whose effective controls differ from `other`'s (num_hidden_layers when none do).

        Controls are compared as written: restating the model's own value (top_k=k) counts as a change.
        """
        for layer in range(config.num_hidden_layers):
            if self.latent_for(layer) != other.latent_for(layer) or self.fp8_for(layer) != other.fp8_for(layer):
                return layer
            if self._v4_for(layer, config) != other._v4_for(layer, config):
                return layer
            if config.is_moe_layer(layer) and (self.routing_for(layer, config) != other.routing_for(layer, config)
                                               or self._replay_at(layer) is not other._replay_at(layer)):
                return layer
        return config.num_hidden_layers

    def _replay_at(self, layer: int) -> RoutingReplay | None:
        return self.routing_replay if self.replayed(layer) else None

    # ------------------------------------------------------------------ checks
    def validate(self, config: ModelConfig, *, checkpoint: str | None = None) -> Controls:
        """Raise ControlError naming the first impossible setting; return self so calls chain. `checkpoint` (the
        running model's digest) is checked against a routing replay's recording model."""
        L, moe = config.num_hidden_layers, config.moe_layers
        for key in self.routing:
            if key == "all":
                if not moe:
                    raise ControlError("routing['all']: this model has no MoE layers")
            elif not 0 <= key < L:
                raise ControlError(f"routing[{key}]: unknown layer; the model has layers 0..{L - 1}")
            elif key not in moe:
                raise ControlError(f"routing[{key}]: layer {key} is a dense layer with no router; MoE layers: {list(moe)}")
        for layer in moe:
            rc = self.routing_for(layer, config)
            if rc is not None:
                _check_routing(rc, config, layer)
        for key, lc in self.latent.items():
            if key != "all" and not 0 <= key < L:
                raise ControlError(f"latent[{key}]: unknown layer; the model has layers 0..{L - 1}")
            if config.is_v4:
                raise ControlError(f"latent[{key!r}]: a latent control projects MLA's c_kv; deepseek_v4 attention "
                                   "has no MLA latent")
            where = f"latent[{key!r}]"
            if lc.basis not in ("svd", "raw"):
                raise ControlError(f"{where}.basis must be 'svd' or 'raw', got {lc.basis!r}")
            if not 1 <= lc.rank <= config.kv_lora_rank:
                raise ControlError(f"{where}.rank={lc.rank} must be in 1..kv_lora_rank={config.kv_lora_rank}")
        for key, sites in self.fp8.items():
            if key == "all":
                continue
            if not 0 <= key < L:
                raise ControlError(f"fp8[{key}]: unknown layer; the model has layers 0..{L - 1}")
            absent = sorted(set(sites) - fp8_layer_sites(config, key) - {"all", *SITE_GROUPS})
            if absent:
                raise ControlError(f"fp8[{key}]: layer {key} has no {absent} (it has {sorted(fp8_layer_sites(config, key))})")
        if self.routing_replay is not None:
            _check_replay(self.routing_replay, config, lambda layer: self.routing_for(layer, config), checkpoint)
        self._validate_v4(config)
        return self

    def _validate_v4(self, config: ModelConfig) -> None:
        """The attention, tid2eid, mhc_identity and swiglu_limit sections."""
        L = config.num_hidden_layers
        for section in ("attention", "tid2eid", "mhc_identity", "swiglu_limit"):
            for key in getattr(self, section):
                if key != "all" and not 0 <= key < L:
                    raise ControlError(f"{section}[{key}]: unknown layer; the model has layers 0..{L - 1}")
        for section in ("mhc_identity", "swiglu_limit"):
            if getattr(self, section) and not config.is_v4:
                raise ControlError(f"{section}: a deepseek_v4 control; this is a {config.model_type} model")
        for key, ac in self.attention.items():
            if key != "all":
                check_own_fields(ac, config, key)
            elif not any(name in applies(config, layer) for layer in range(L) for name in ac.set_fields()):
                raise ControlError(f"attention['all']: no layer of this {config.model_type} model has what "
                                   f"{list(ac.set_fields())} change (an indexer, V4's window or compressed branch)")
        for layer in range(L):
            merged = self.attention_for(layer, config)
            if merged is not None:
                check_attention(merged, config, layer)
        check_tid2eid(self.tid2eid, config)

    # ------------------------------------------------------------------ to the model
    def resolve(self, config: ModelConfig, *, svd_bases: Mapping[int, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                checkpoint: str | None = None) -> dict[int, LayerControls]:
        """Validated controls -> {layer: LayerControls} for `DeepSeekModel.forward(controls=...)`.

        `svd_bases` maps a layer to its full right-singular basis [C, C] (columns by decreasing singular value);
        needed for every layer whose latent control uses basis "svd".
        """
        self.validate(config, checkpoint=checkpoint)
        base = RoutingParams.from_config(config)
        out: dict[int, LayerControls] = {}
        for layer in range(config.num_hidden_layers):
            rc = self.routing_for(layer, config) if config.is_moe_layer(layer) else None
            lc = self.latent_for(layer)
            fp8 = self.fp8_for(layer)
            replay = self._replay_at(layer)
            v4 = self._v4_for(layer, config)
            if rc is None and lc is None and fp8 is None and replay is None and v4 == (None, {}, False, None):
                continue
            routing = _route_override(rc or RoutingControl(), config, base, device) if rc or replay else None
            if replay is not None and routing is not None:
                routing = dataclasses.replace(routing, replay_ids=replay.expert_ids[layer].to(device),
                                              replay_weights=replay.expert_weights[layer].to(device))
            basis = _latent_basis(lc, config, layer, svd_bases, dtype, device) if lc is not None else None
            have = fp8_layer_sites(config, layer)
            sites = _fp8_expand(fp8, have) & have if fp8 is not None else None
            out[layer] = LayerControls(routing=routing, latent_basis=basis, fp8_sites=sites,
                                       **_v4_layer_controls(self, config, layer, device))
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"routing": {str(k): v.to_dict() for k, v in self.routing.items()},
                               "latent": {str(k): v.to_dict() for k, v in self.latent.items()}}
        if self.fp8:
            out["fp8"] = {str(k): list(v) for k, v in self.fp8.items()}
        if self.routing_replay is not None:
            out["replay"] = self.routing_replay.to_dict()
        if self.attention:
            out["attention"] = {str(k): v.to_dict() for k, v in self.attention.items()}
        if self.tid2eid:
            out["tid2eid"] = {str(k): {str(t): list(e) for t, e in rows.items()} for k, rows in self.tid2eid.items()}
        if self.mhc_identity:
            out["mhc_identity"] = {str(k): v for k, v in self.mhc_identity.items()}
        if self.swiglu_limit:
            out["swiglu_limit"] = {str(k): v for k, v in self.swiglu_limit.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Controls:
        """From `to_dict`'s shape; every level is checked, so a list where an object belongs is named, not crashed on."""
        d = _need_mapping(d, "controls", f"an object with sections {list(SECTIONS)}")
        unknown = sorted(set(d) - set(SECTIONS), key=str)
        if unknown:
            raise ControlError(f"controls: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
        replay = d.get("replay")
        return cls(routing=_section(d, "routing", RoutingControl.from_dict),
                   latent=_section(d, "latent", LatentControl.from_dict),
                   fp8=d.get("fp8", {}),  # checked level by level in _frozen_fp8
                   routing_replay=RoutingReplay.from_dict(replay) if replay is not None else None,
                   attention=_section(d, "attention", AttentionControl.from_dict),
                   tid2eid=d.get("tid2eid", {}), mhc_identity=d.get("mhc_identity", {}),
                   swiglu_limit=d.get("swiglu_limit", {}))  # each checked in __post_init__

    @classmethod
    def from_json(cls, text: str) -> Controls:
        if not isinstance(text, (str, bytes, bytearray)):
            raise ControlError(f"controls: from_json takes JSON text, got {type(text).__name__}; use from_dict for a dict")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ControlError(f"controls: not valid JSON ({e})") from None
        return cls.from_dict(data)


def _per_layer(experts: Mapping[LayerKey, Iterable[int]] | Iterable[int], what: str) -> dict[LayerKey, list[int]]:
    """{layer or "all": expert ids} from a mapping, or from a bare list meaning every MoE layer."""
    if isinstance(experts, Mapping):
        out = dict(experts)
    elif isinstance(experts, (str, bytes)):
        raise ControlError(f"Controls.{what} takes {{layer: [experts]}} or a list of expert ids, got {experts!r}")
    else:
        out = {"all": experts}
    for key, ids in out.items():
        if isinstance(ids, (int, str)):
            raise ControlError(f"Controls.{what}: layer {key!r} needs a list of expert ids, got {ids!r}")
    return {k: list(v) for k, v in out.items()}


def _layers(layers: Iterable[int] | LayerKey) -> list[LayerKey]:
    if isinstance(layers, (int, str)):
        return [layers]
    if not isinstance(layers, Iterable):
        raise ControlError(f"layers must be a layer, 'all' or a list of layers, got {layers!r}")
    return list(layers)


def _section(d: Mapping[str, Any], name: str, load: Callable[[Any, str], Any]) -> dict[LayerKey, Any]:
    """One JSON section {layer: entry} -> {layer key: control}, each entry's messages starting with `name[layer]`."""
    entries = _need_mapping(d.get(name, {}), f"controls[{name!r}]", f"an object of layer (or 'all') -> {name} control")
    out: dict[LayerKey, Any] = {}
    for key, entry in entries.items():
        layer = _layer_key(key, name)
        out[layer] = load(entry, f"{name}[{layer!r}]")
    return out


def _frozen_by_layer(entries: Mapping[Any, Any], what: str) -> Mapping[LayerKey, Any]:
    _need_mapping(entries, what, f"a mapping of layer (or 'all') -> {what} control")
    out: dict[LayerKey, Any] = {}
    for key, value in dict(entries).items():
        out[_layer_key(key, what)] = value
    ints = sorted(k for k in out if k != "all")
    ordered: dict[LayerKey, Any] = {"all": out["all"]} if "all" in out else {}
    ordered.update({k: out[k] for k in ints})
    expected = {"routing": RoutingControl, "latent": LatentControl, "attention": AttentionControl}[what]
    for key, value in ordered.items():
        if not isinstance(value, expected):
            raise ControlError(f"{what}[{key!r}] must be a {expected.__name__}, got {type(value).__name__}")
    return MappingProxyType(ordered)


SECTIONS = ("routing", "latent", "fp8", "replay", "attention", "tid2eid", "mhc_identity", "swiglu_limit")


def _frozen_values(entries: Mapping[Any, Any], what: str, check: Callable[[Any, str], Any]) -> Mapping[LayerKey, Any]:
    """{layer key: value} for a section of plain values, each checked by `check(value, where)`, "all" first."""
    _need_mapping(entries, what, f"an object of layer (or 'all') -> {what} value")
    out = {_layer_key(key, what): value for key, value in dict(entries).items()}
    ordered: dict[LayerKey, Any] = {"all": out["all"]} if "all" in out else {}
    ordered.update({k: out[k] for k in sorted(k for k in out if k != "all")})
    return MappingProxyType({key: check(value, f"{what}[{key!r}]") for key, value in ordered.items()})


def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ControlError(f"{where} must be true or false, got {value!r}")
    return value


def _as_limit(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(f"{where} must be a number > 0, got {value!r}")
    try:
        limit = float(value)
    except OverflowError:
        limit = float("inf")
    if not (_fits_fp32(limit) and limit > 0):
        raise ControlError(f"{where} must be > 0 and finite in float32 (up to {FP32_MAX:.4g}), got {value!r}")
    return limit


def _v4_layer_controls(controls: Controls, config: ModelConfig, layer: int,
                       device: torch.device | str) -> dict[str, Any]:
    """The LayerControls fields of the attention, tid2eid, mhc_identity and swiglu_limit sections for `layer`."""
    ac = controls.attention_for(layer, config)
    out: dict[str, Any] = {"mhc_identity": controls.mhc_identity_for(layer),
                           "swiglu_limit": controls.swiglu_limit_for(layer)}
    rows = controls.tid2eid_for(layer)
    if rows:
        out["hash_rows"] = hash_rows(rows, device)
    if ac is not None:
        out["index_topk"] = ac.index_topk
        if ac.dense:
            out["dense_attention"] = True
            if not config.is_v4:  # V3.2: a budget no prompt reaches keeps every causal key (MLA runs as V3's)
                out["index_topk"] = config.max_position_embeddings
        out["sliding_window"] = ac.sliding_window
        out["use_window"] = ac.window is not False
        out["use_compressed"] = ac.compressed is not False
    return out
