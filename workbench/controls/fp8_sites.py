"""FP8 controls: which sites of which layer compute in FP8 for one run.

Design choices:
- FP8 per layer and site (`fp8={layer or "all": [sites] or "all"}`): the listed sites of that layer compute in FP8
  for this run, the others in high precision; read by the model through a per-thread scope, so the shared model's
  modules are never swapped (see `workbench.model.fp8`).
- "all" and site groups stay as written until resolution, where they mean "the sites this layer has", so one entry
  can cover dense layers (mlp) and MoE layers (experts, shared_experts) alike.
- The site names live with the FP8 code, which needs Triton: it is imported only when FP8 controls are used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from workbench.config import ModelConfig
from workbench.controls.keys import ControlError, LayerKey, _layer_key
from workbench.model.fp8 import SITE_GROUPS, SITES, layer_sites_from_config


def fp8_layer_sites(config: ModelConfig, layer: int) -> set[str]:
    """The FP8 sites (workbench.model.fp8.SITES) that exist in `layer` of a model of this config."""
    return layer_sites_from_config(config, layer)


def _fp8_expand(names: Sequence[str], available: set[str]) -> frozenset[str]:
    """Site names, groups and "all" -> the sites of a layer they select ("all" / a group: those it has)."""
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
    out: dict[LayerKey, tuple[str, ...]] = {}
    for key, value in dict(entries).items():
        k = _layer_key(key, "fp8")
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
