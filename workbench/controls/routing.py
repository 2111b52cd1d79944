"""Routing controls: per MoE layer overrides of top-k, groups, biases, ablated and forced experts, temperature.

Design choices:
- `RoutingControl` is a plain frozen dataclass that knows nothing about tensors; a layer's entry is merged over the
  "all" entry field by field (`merged_over`), and `None` keeps the model's own setting.
- `_check_routing` rejects what no router could do (top-k 0 or above the experts left after ablation, forced experts
  that are also ablated, groups too few to hold top-k free experts, ...) naming the layer and field, before anything
  runs; `_route_override` then turns a checked control into the model's `RouteOverride`.
- Float fields are checked against float32, not Python's float64: the router computes in float32 (or bf16, same
  range), where 1e39 is inf and its logits NaN, so a value is refused unless float32 holds it (a temperature also
  needs 1/t to fit: at least float32's smallest normal).

Shape legend: E routed experts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, cast

import torch

from workbench.config import ModelConfig
from workbench.controls.keys import ControlError, _from_fields, _integral, _need_type
from workbench.model.routing import RouteOverride, RoutingParams

# fields that change which experts are chosen: a V4 hash layer (experts = tid2eid[token id]) makes no choice
SELECTION_FIELDS = ("top_k", "bias_offset", "force", "topk_group")


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
                object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        for name in ("norm_topk_prob", "shared_experts"):
            _need_type(self, name, bool)
        if self.bias_offset is not None:
            object.__setattr__(self, "bias_offset", _offsets(self.bias_offset))
        for name in ("ablate", "force"):
            value = getattr(self, name)
            if value is not None:
                ids = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)) else None
                if ids is None or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                    raise ControlError(f"routing {name} must be a list of expert ids, got {value!r}")
                object.__setattr__(self, name, tuple(int(e) for e in ids))

    def for_hash_layer(self) -> RoutingControl | None:
        """This control without the fields a hash-routed layer cannot apply (`SELECTION_FIELDS`: its experts are
        tid2eid[token id]), as an "all" entry reaches such a layer; None when nothing is left."""
        kept = dict.fromkeys(SELECTION_FIELDS)
        out = dataclasses.replace(self, **kept)
        return None if out == RoutingControl() else out

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
    def from_dict(cls, d: Mapping[str, Any], where: str = "routing control") -> RoutingControl:
        """From JSON's object of fields; `where` (e.g. "routing[2]") starts every message, so it names the layer."""
        # JSON's string expert keys become ints in __post_init__
        return cast("RoutingControl", _from_fields(cls, d, where, "an object of routing fields"))


# the model computes in float32 (or bf16, whose range is the same): a value past this is inf there, and NaN follows
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32; below it 1/x overflows


def _fits_fp32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FP32_MAX


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past float64's range
        raise ControlError(f"routing {name} overflows float32, got an int of {len(str(value))} digits") from None


def _offsets(value: Any) -> Mapping[int, float]:
    """{expert: offset} with int experts (JSON's "7" included; 1.9 or True refused) and number offsets, sorted."""
    if not isinstance(value, Mapping):
        raise ControlError(f"routing bias_offset must map expert -> offset, got {value!r}")
    out: dict[int, float] = {}
    for key, offset in value.items():
        expert = _integral(key)
        if expert is None:
            raise ControlError(f"routing bias_offset must map expert -> offset; {key!r} is not an expert id")
        if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
            raise ControlError(f"routing bias_offset must map expert -> offset; expert {expert} has {offset!r}, "
                               "not a number")
        out[expert] = _as_float(f"bias_offset[{expert}]", offset)
    return MappingProxyType(dict(sorted(out.items())))


def _check_routing(rc: RoutingControl, config: ModelConfig, layer: int) -> None:
    E, where = config.n_routed_experts, f"routing for layer {layer}"

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ControlError(f"{where}: {msg}")

    if config.is_hash_layer(layer):
        fixed = [name for name in SELECTION_FIELDS if getattr(rc, name) is not None]
        need(not fixed, f"layer {layer} is hash-routed (experts = tid2eid[token id]): {fixed} would change the "
             "selection, which this layer does not make; ablate, temperature, routed_scaling_factor, "
             "norm_topk_prob and shared_experts apply, and Controls(tid2eid=...) edits its table")
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
        wild = {e: v for e, v in rc.bias_offset.items() if not _fits_fp32(v)}
        need(not wild, f"bias_offset values must be finite in float32 (|offset| <= {FP32_MAX:.4g}), got {wild}")
    if rc.temperature is not None:
        t = rc.temperature
        need(_fits_fp32(t) and t >= FP32_TINY,
             f"temperature must be > 0 and finite in float32 ({FP32_TINY:.4g}..{FP32_MAX:.4g}), got {t!r}")
    if rc.routed_scaling_factor is not None:
        f = rc.routed_scaling_factor
        need(_fits_fp32(f) and f >= 0, f"routed_scaling_factor must be finite in float32 and >= 0 "
                                       f"(0..{FP32_MAX:.4g}), got {f!r}")


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
