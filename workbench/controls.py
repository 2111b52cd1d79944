"""Controls: live interventions on routing and the MLA latent, as validated, JSON-serialisable data.

Design choices:
- Plain frozen dataclasses (`RoutingControl`, `LatentControl`, `Controls`) that know nothing about tensors, so a set
  of controls can be stored in trace attrs, sent from a widget, and compared to find the first layer a change touches.
- Keys are a layer index or "all"; a layer's own entry overrides the "all" entry field by field (routing) or as a
  whole (latent). Every `None` field means "as the model is".
- `validate(config)` rejects impossible settings (unknown or dense layer, top-k 0 or above the experts left after
  ablation, forced experts that are also ablated, rank above the latent width, ...) with a message that names the
  layer and field, before anything runs; `resolve()` then turns them into the model's `LayerControls`.
- Latent truncation keeps the first r directions of a basis: the raw first r dims of c_kv, or the right singular
  vectors of a calibration run's latents (`svd_basis`; uncentred, so the projection stays linear and absorb-safe).
- FP8 per layer and site (`fp8={layer or "all": [sites] or "all"}`): the listed sites of that layer compute in FP8
  for this run, the others in high precision; read by the model through a per-thread scope, so the shared model's
  modules are never swapped (see `workbench.model.fp8`).
- Routing replay (`Controls.replay(store, seq=...)`): the experts and the fp32 weights a trace recorded for one
  sequence are used as they are, never recomputed, so a replay reproduces the recorded forward bit for bit.

Shape legend: E routed experts, C kv_lora_rank, r kept latent directions, N calibration tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from workbench.config import ModelConfig
from workbench.model.moe import RouteOverride, RoutingParams
from workbench.model.transformer import LayerControls

if TYPE_CHECKING:
    import xarray as xr

LayerKey = int | Literal["all"]
LatentBasis = Literal["svd", "raw"]


class ControlError(ValueError):
    """A control no model of this config could obey; the message names the layer and the field."""


@dataclasses.dataclass(frozen=True)
class RoutingControl:
    """Routing overrides for one MoE layer (or all of them); None keeps the model's own setting."""

    top_k: int | None = None  # experts per token
    bias_offset: Mapping[int, float] | None = None  # {expert: offset} added to the selection scores only
    ablate: tuple[int, ...] | None = None  # experts that are never selected
    force: tuple[int, ...] | None = None  # experts always selected, in the first slots, in this order
    topk_group: int | None = None  # groups a token may route into
    routed_scaling_factor: float | None = None
    norm_topk_prob: bool | None = None
    shared_experts: bool | None = None  # False switches the shared experts off
    temperature: float | None = None  # router logits are divided by it before scoring

    def __post_init__(self) -> None:
        for name in ("top_k", "topk_group"):
            _need_type(self, name, int)
        for name in ("routed_scaling_factor", "temperature"):
            if _need_type(self, name, (int, float)):
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("norm_topk_prob", "shared_experts"):
            _need_type(self, name, bool)
        if self.bias_offset is not None:
            if not isinstance(self.bias_offset, Mapping):
                raise ControlError(f"routing bias_offset must map expert -> offset, got {self.bias_offset!r}")
            try:
                offsets = {int(e): float(v) for e, v in self.bias_offset.items()}
            except (TypeError, ValueError):
                raise ControlError(f"routing bias_offset must map expert -> offset, got {dict(self.bias_offset)}") from None
            object.__setattr__(self, "bias_offset", MappingProxyType(dict(sorted(offsets.items()))))
        for name in ("ablate", "force"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not all(isinstance(e, int) and not isinstance(e, bool) for e in value):
                    raise ControlError(f"routing {name} must be a list of expert ids, got {value!r}")
                object.__setattr__(self, name, tuple(int(e) for e in value))

    def merged_over(self, base: RoutingControl | None) -> RoutingControl:
        """This control's set fields over `base`'s (a layer's entry over the "all" entry)."""
        if base is None:
            return self
        mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **mine)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "bias_offset":
                value = {str(e): v for e, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingControl:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ControlError(f"routing control: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)  # JSON's string expert keys become ints in __post_init__


@dataclasses.dataclass(frozen=True)
class LatentControl:
    """Keep only the first `rank` directions of one layer's KV latent c_kv."""

    rank: int
    basis: LatentBasis = "svd"  # svd: of a calibration run's latents; raw: the first `rank` dims of c_kv

    def __post_init__(self) -> None:
        _need_type(self, "rank", int)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "basis": self.basis}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatentControl:
        unknown = sorted(set(d) - {"rank", "basis"})
        if unknown or "rank" not in d:
            raise ControlError(f"latent control needs 'rank' (and optionally 'basis'); got fields {sorted(d)}")
        return cls(d["rank"], d.get("basis", "svd"))


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingReplay:
    """The routing a trace recorded for one sequence: per MoE layer the chosen experts and the weights applied.

    Equal only to itself (the arrays are not compared); JSON keeps the store path and seq, from which it reloads.
    """

    token_ids: tuple[int, ...]  # the recorded sequence: the prompt a replay must run
    expert_ids: Mapping[int, torch.Tensor]  # MoE layer -> [S, k] int64
    expert_weights: Mapping[int, torch.Tensor]  # MoE layer -> [S, k] fp32, bit for bit as stored
    model_config: str  # the recording model's HF config, JSON
    source: str  # the store path ("" for an in-memory Dataset)
    seq: int

    @classmethod
    def from_trace(cls, trace: str | Path | xr.Dataset, seq: int = 0, layers: Iterable[int] | None = None
                   ) -> RoutingReplay:
        """Read sequence `seq` of a trace store (path) or Dataset; `layers` (MoE layers) limits what is replayed."""
        import xarray as xr

        from workbench.trace import open_trace

        where = "an in-memory trace" if isinstance(trace, xr.Dataset) else str(trace)
        ds = trace if isinstance(trace, xr.Dataset) else open_trace(trace)
        missing = [v for v in ("expert_ids", "expert_weights") if v not in ds]
        if missing:
            raise ControlError(f"replay: {where} holds no {missing}; record it with sites expert_ids expert_weights")
        rows = np.nonzero(np.asarray(ds["seq"].values) == seq)[0]
        if len(rows) == 0:
            raise ControlError(f"replay: {where} has no tokens of seq {seq}")
        one = ds.isel(token=rows).sortby("pos")
        moe_layers = [int(v) for v in one["layer"].values]
        chosen = moe_layers if layers is None else [int(v) for v in layers]
        unknown = [v for v in chosen if v not in moe_layers]
        if unknown:
            raise ControlError(f"replay: layers {unknown} are not MoE layers of {where} ({moe_layers})")
        ids = np.asarray(one["expert_ids"].transpose("token", "layer", "slot").values)  # [S, L, k]
        weights = np.asarray(one["expert_weights"].transpose("token", "layer", "slot").values)  # [S, L, k]
        lost = [v for v in chosen if (ids[:, moe_layers.index(v)] < 0).any()]
        if lost:
            raise ControlError(f"replay: {where} did not capture the routing of layers {lost} for seq {seq}")
        return cls(tuple(int(t) for t in one["token_id"].values),
                   MappingProxyType({v: torch.from_numpy(ids[:, moe_layers.index(v)].astype(np.int64))
                                     for v in chosen}),
                   MappingProxyType({v: torch.from_numpy(weights[:, moe_layers.index(v)].astype(np.float32))
                                     for v in chosen}),
                   str(ds.attrs.get("model_config", "")), "" if isinstance(trace, xr.Dataset) else str(trace), seq)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seq": self.seq, "layers": sorted(self.expert_ids)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingReplay:
        if not d.get("source"):
            raise ControlError("replay: recorded from an in-memory trace, so JSON cannot bring it back; "
                               "replay from a store path")
        return cls.from_trace(d["source"], int(d.get("seq", 0)), d.get("layers"))


@dataclasses.dataclass(frozen=True)
class Controls:
    """Every intervention of one run. `Controls()` is the baseline."""

    routing: Mapping[LayerKey, RoutingControl] = dataclasses.field(default_factory=dict)
    latent: Mapping[LayerKey, LatentControl] = dataclasses.field(default_factory=dict)
    # layer or "all" -> the sites computing in FP8 there ("all", or names/groups from workbench.model.fp8.SITES)
    fp8: Mapping[LayerKey, Sequence[str] | str] = dataclasses.field(default_factory=dict)
    routing_replay: RoutingReplay | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", _frozen_by_layer(self.routing, "routing"))
        object.__setattr__(self, "latent", _frozen_by_layer(self.latent, "latent"))
        object.__setattr__(self, "fp8", _frozen_fp8(self.fp8))
        if self.routing_replay is not None and not isinstance(self.routing_replay, RoutingReplay):
            raise ControlError(f"routing_replay must be a RoutingReplay, got {type(self.routing_replay).__name__}")

    @classmethod
    def replay(cls, trace: str | Path | xr.Dataset, seq: int = 0, layers: Iterable[int] | None = None,
               **others: Any) -> Controls:
        """Controls that force the routing recorded for `seq` in a trace store or Dataset (see RoutingReplay)."""
        return cls(routing_replay=RoutingReplay.from_trace(trace, seq, layers), **others)

    # ------------------------------------------------------------------ per layer
    def routing_for(self, layer: int) -> RoutingControl | None:
        everywhere, own = self.routing.get("all"), self.routing.get(layer)
        return own.merged_over(everywhere) if own is not None else everywhere

    def latent_for(self, layer: int) -> LatentControl | None:
        own = self.latent.get(layer)
        return own if own is not None else self.latent.get("all")

    def fp8_for(self, layer: int) -> tuple[str, ...] | None:
        """The sites this run asks to compute in FP8 in `layer` (None: as the model is)."""
        own = self.fp8.get(layer)
        return tuple(own) if own is not None else (tuple(self.fp8["all"]) if "all" in self.fp8 else None)

    def replayed(self, layer: int) -> bool:
        return self.routing_replay is not None and layer in self.routing_replay.expert_ids

    def first_difference(self, other: Controls, config: ModelConfig) -> int:
        """The first layer whose effective controls differ from `other`'s (num_hidden_layers when none do).

        Controls are compared as written: restating the model's own value (top_k=k) counts as a change.
        """
        for layer in range(config.num_hidden_layers):
            if self.latent_for(layer) != other.latent_for(layer) or self.fp8_for(layer) != other.fp8_for(layer):
                return layer
            if config.is_moe_layer(layer) and (self.routing_for(layer) != other.routing_for(layer)
                                               or self._replay_at(layer) is not other._replay_at(layer)):
                return layer
        return config.num_hidden_layers

    def _replay_at(self, layer: int) -> RoutingReplay | None:
        return self.routing_replay if self.replayed(layer) else None

    # ------------------------------------------------------------------ checks
    def validate(self, config: ModelConfig) -> Controls:
        """Raise ControlError naming the first impossible setting; return self so calls chain."""
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
            rc = self.routing_for(layer)
            if rc is not None:
                _check_routing(rc, config, layer)
        for key, lc in self.latent.items():
            if key != "all" and not 0 <= key < L:
                raise ControlError(f"latent[{key}]: unknown layer; the model has layers 0..{L - 1}")
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
            absent = sorted(set(sites) - fp8_layer_sites(config, key) - {"all", "attn"})
            if absent:
                raise ControlError(f"fp8[{key}]: layer {key} has no {absent} (it has {sorted(fp8_layer_sites(config, key))})")
        if self.routing_replay is not None:
            _check_replay(self, config)
        return self

    # ------------------------------------------------------------------ to the model
    def resolve(self, config: ModelConfig, *, svd_bases: Mapping[int, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict[int, LayerControls]:
        """Validated controls -> {layer: LayerControls} for `DeepSeekModel.forward(controls=...)`.

        `svd_bases` maps a layer to its full right-singular basis [C, C] (columns by decreasing singular value);
        needed for every layer whose latent control uses basis "svd".
        """
        self.validate(config)
        base = RoutingParams.from_config(config)
        out: dict[int, LayerControls] = {}
        for layer in range(config.num_hidden_layers):
            rc = self.routing_for(layer) if config.is_moe_layer(layer) else None
            lc = self.latent_for(layer)
            fp8 = self.fp8_for(layer)
            replay = self._replay_at(layer)
            if rc is None and lc is None and fp8 is None and replay is None:
                continue
            routing = _route_override(rc or RoutingControl(), config, base, device) if rc or replay else None
            if replay is not None and routing is not None:
                routing = dataclasses.replace(routing, replay_ids=replay.expert_ids[layer].to(device),
                                              replay_weights=replay.expert_weights[layer].to(device))
            basis = _latent_basis(lc, config, layer, svd_bases, dtype, device) if lc is not None else None
            have = fp8_layer_sites(config, layer)
            sites = _fp8_expand(fp8, have) & have if fp8 is not None else None
            out[layer] = LayerControls(routing=routing, latent_basis=basis, fp8_sites=sites)
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"routing": {str(k): v.to_dict() for k, v in self.routing.items()},
                               "latent": {str(k): v.to_dict() for k, v in self.latent.items()}}
        if self.fp8:
            out["fp8"] = {str(k): list(v) for k, v in self.fp8.items()}
        if self.routing_replay is not None:
            out["replay"] = self.routing_replay.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Controls:
        unknown = sorted(set(d) - {"routing", "latent", "fp8", "replay"})
        if unknown:
            raise ControlError(f"controls: unknown section(s) {unknown}; known: ['fp8', 'latent', 'replay', 'routing']")
        return cls(routing={_layer_key(k): RoutingControl.from_dict(v) for k, v in d.get("routing", {}).items()},
                   latent={_layer_key(k): LatentControl.from_dict(v) for k, v in d.get("latent", {}).items()},
                   fp8=dict(d.get("fp8", {})),
                   routing_replay=RoutingReplay.from_dict(d["replay"]) if d.get("replay") else None)

    @classmethod
    def from_json(cls, text: str) -> Controls:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ControlError(f"controls: not valid JSON ({e})") from None
        return cls.from_dict(data)


def svd_basis(latents: torch.Tensor) -> torch.Tensor:
    """Calibration latents [N, C] -> orthonormal basis [C, C], columns by decreasing singular value.

    Uncentred on purpose: truncation must stay a linear map of c_kv. With N < C the trailing columns are an arbitrary
    orthonormal completion (their singular values are zero).
    """
    _, _, vh = torch.linalg.svd(latents.double(), full_matrices=True)  # vh [C, C]
    return vh.T.float()


def fp8_layer_sites(config: ModelConfig, layer: int) -> set[str]:
    """The FP8 sites (workbench.model.fp8.SITES) that exist in `layer` of a model of this config."""
    from workbench.model.fp8 import ATTN_SITES  # the site names live with the FP8 code (which needs Triton)

    attn = {p for p in ATTN_SITES if p not in (("q_a_proj", "q_b_proj") if config.q_lora_rank is None else ("q_proj",))}
    if not config.is_moe_layer(layer):
        return attn | {"mlp"}
    return attn | {"experts"} | ({"shared_experts"} if config.n_shared_experts > 0 else set())


# ---------------------------------------------------------------------- helpers
def _fp8_expand(names: Sequence[str], available: set[str]) -> frozenset[str]:
    """Site names, groups and "all" -> the sites of a layer they select ("all" / a group: those it has)."""
    from workbench.model.fp8 import SITE_GROUPS

    out: set[str] = set()
    for n in names:
        out |= available if n == "all" else set(SITE_GROUPS[n]) & available if n in SITE_GROUPS else {n}
    return frozenset(out)


def _frozen_fp8(entries: Mapping[Any, Sequence[str] | str]) -> Mapping[LayerKey, tuple[str, ...]]:
    """Layer keys checked and ordered ("all" first); each value a sorted tuple of site names, groups or "all"."""
    if not isinstance(entries, Mapping):
        raise ControlError(f"fp8 must map layer (or 'all') -> sites, got {entries!r}")
    if not entries:
        return MappingProxyType({})
    from workbench.model.fp8 import SITE_GROUPS, SITES  # only FP8 controls need the FP8 code (and Triton)

    out: dict[LayerKey, tuple[str, ...]] = {}
    for key, value in dict(entries).items():
        k = _layer_key(key)
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ControlError(f"fp8[{k!r}] must be 'all' or a list of site names, got {value!r}")
        unknown = [n for n in names if n != "all" and n not in SITE_GROUPS and n not in SITES]
        if unknown:
            raise ControlError(f"fp8[{k!r}]: unknown site {unknown[0]!r}; known: {['all', *SITE_GROUPS, *SITES]}")
        out[k] = tuple(sorted(set(names)))  # "all" and groups stay as written: they mean "those the layer has"
    ordered: dict[LayerKey, tuple[str, ...]] = {"all": out["all"]} if "all" in out else {}
    ordered.update({k: out[k] for k in sorted(k for k in out if k != "all")})
    return MappingProxyType(ordered)


def _check_replay(controls: Controls, config: ModelConfig) -> None:
    replay = controls.routing_replay
    assert replay is not None
    where = f"replay of {replay.source or 'an in-memory trace'} (seq {replay.seq})"
    ours = json.dumps(config.to_hf_dict(), sort_keys=True)
    if replay.model_config and json.loads(replay.model_config) != json.loads(ours):
        raise ControlError(f"{where}: recorded with another model (its config differs from this model's)")
    E = config.n_routed_experts
    for layer, ids in replay.expert_ids.items():
        if not config.is_moe_layer(layer):
            raise ControlError(f"{where}: layer {layer} is not an MoE layer of this model")
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < E):
            raise ControlError(f"{where}: layer {layer} names experts outside 0..{E - 1}")
        rc = controls.routing_for(layer)
        clash = sorted(k for k, v in (rc.to_dict() if rc else {}).items() if k != "shared_experts")
        if clash:
            raise ControlError(f"{where}: layer {layer} is replayed, so routing fields {clash} cannot apply there")



def _frozen_by_layer(entries: Mapping[Any, Any], what: str) -> Mapping[LayerKey, Any]:
    out: dict[LayerKey, Any] = {}
    for key, value in dict(entries).items():
        out[_layer_key(key)] = value
    ints = sorted(k for k in out if k != "all")
    ordered: dict[LayerKey, Any] = {"all": out["all"]} if "all" in out else {}
    ordered.update({k: out[k] for k in ints})
    for key, value in ordered.items():
        expected = RoutingControl if what == "routing" else LatentControl
        if not isinstance(value, expected):
            raise ControlError(f"{what}[{key!r}] must be a {expected.__name__}, got {type(value).__name__}")
    return MappingProxyType(ordered)


def _need_type(control: object, name: str, kind: type | tuple[type, ...]) -> bool:
    """Raise unless the field is None or of `kind` (bool is not a number here); True when it is set."""
    value = getattr(control, name)
    if value is None:
        return False
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        wanted = kind.__name__ if isinstance(kind, type) else "a number"
        raise ControlError(f"{type(control).__name__}.{name} must be {wanted}, got {value!r}")
    return True


def _layer_key(key: Any) -> LayerKey:
    if key == "all":
        return "all"
    if isinstance(key, bool):
        raise ControlError(f"layer key must be an int or 'all', got {key!r}")
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ControlError(f"layer key must be an int or 'all', got {key!r}") from None


def _check_routing(rc: RoutingControl, config: ModelConfig, layer: int) -> None:
    E, where = config.n_routed_experts, f"routing for layer {layer}"

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ControlError(f"{where}: {msg}")

    ablate, force = rc.ablate or (), rc.force or ()
    for name, experts in (("ablate", ablate), ("force", force)):
        bad = [e for e in experts if not 0 <= e < E]
        need(not bad, f"{name} names expert(s) {bad} outside 0..{E - 1}")
        need(len(set(experts)) == len(experts), f"{name} lists an expert twice: {list(experts)}")
    both = sorted(set(ablate) & set(force))
    need(not both, f"expert(s) {both} are both forced and ablated")
    k = rc.top_k if rc.top_k is not None else config.num_experts_per_tok
    left = E - len(ablate)
    need(left >= 1, "every expert is ablated")
    need(1 <= k <= left, f"top_k={k} must be in 1..{left} (the {E} experts less {len(ablate)} ablated)")
    need(len(force) <= k, f"{len(force)} forced experts do not fit in top_k={k} slots")
    groups = rc.topk_group if rc.topk_group is not None else config.topk_group
    need(1 <= groups <= config.n_group, f"topk_group={groups} must be in 1..n_group={config.n_group}")
    if config.n_group > 1 and config.topk_method in ("group_limited_greedy", "noaux_tc"):
        # the worst case: the kept groups are the ones with the fewest experts still free after ablation and forcing
        per_group = E // config.n_group
        taken = set(ablate) | set(force)
        free = sorted(per_group - sum(1 for e in taken if e // per_group == g) for g in range(config.n_group))
        need(sum(free[:groups]) >= k - len(force),
             f"with {groups} of {config.n_group} groups kept, the groups could hold only {sum(free[:groups])} "
             f"free experts after ablation/forcing, fewer than the {k - len(force)} to choose")
    if rc.bias_offset is not None:
        bad = [e for e in rc.bias_offset if not 0 <= e < E]
        need(not bad, f"bias_offset names expert(s) {bad} outside 0..{E - 1}")
        need(all(math.isfinite(v) for v in rc.bias_offset.values()), "bias_offset values must be finite")
    if rc.temperature is not None:
        need(math.isfinite(rc.temperature) and rc.temperature > 0, f"temperature must be > 0, got {rc.temperature}")
    if rc.routed_scaling_factor is not None:
        need(math.isfinite(rc.routed_scaling_factor) and rc.routed_scaling_factor >= 0,
             f"routed_scaling_factor must be finite and >= 0, got {rc.routed_scaling_factor}")


def _route_override(rc: RoutingControl, config: ModelConfig, base: RoutingParams,
                    device: torch.device | str) -> RouteOverride:
    E = config.n_routed_experts
    params = dataclasses.replace(
        base,
        top_k=rc.top_k if rc.top_k is not None else base.top_k,
        topk_group=rc.topk_group if rc.topk_group is not None else base.topk_group,
        norm_topk_prob=rc.norm_topk_prob if rc.norm_topk_prob is not None else base.norm_topk_prob,
        routed_scaling_factor=(rc.routed_scaling_factor if rc.routed_scaling_factor is not None
                               else base.routed_scaling_factor))
    offset = None
    if rc.bias_offset:
        offset = torch.zeros(E, device=device)  # [E]
        offset[list(rc.bias_offset)] = torch.tensor(list(rc.bias_offset.values()), device=device)
    mask = None
    if rc.ablate:
        mask = torch.ones(E, dtype=torch.bool, device=device)  # [E]
        mask[list(rc.ablate)] = False
    force = torch.tensor(rc.force, dtype=torch.long, device=device) if rc.force else None  # [f]
    return RouteOverride(params=params, bias_offset=offset, mask=mask, force=force,
                         temperature=rc.temperature if rc.temperature is not None else 1.0,
                         shared_experts=rc.shared_experts if rc.shared_experts is not None else True)


def _latent_basis(lc: LatentControl, config: ModelConfig, layer: int, svd_bases: Mapping[int, torch.Tensor] | None,
                  dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    C = config.kv_lora_rank
    if lc.basis == "raw":
        return torch.eye(C, dtype=dtype, device=device)[:, : lc.rank]  # [C, r]
    if svd_bases is None or layer not in svd_bases:
        raise ControlError(f"latent for layer {layer}: basis 'svd' needs a calibration run (none given for this layer)")
    full = svd_bases[layer]
    if tuple(full.shape) != (C, C):
        raise ControlError(f"latent for layer {layer}: calibration basis has shape {tuple(full.shape)}, expected {(C, C)}")
    return full[:, : lc.rank].to(dtype=dtype, device=device)  # [C, r]
