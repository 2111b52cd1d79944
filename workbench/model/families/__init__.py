"""Model families: each a small module that assembles the shared blocks from its config; this registry maps an HF
`model_type` to its family, and is how the model, the loader and the checkpoint code find one.

Adding a family is adding its module here (a `FAMILY`, whose `build_block(config, layer, probes)` returns that
layer's `Block`) and its entry in `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from workbench.config import ConfigError, ModelConfig
from workbench.model.block import Block
from workbench.model.families import v2, v3, v4, v32
from workbench.model.v4.block import V4Block
from workbench.probes import ProbeRegistry


@dataclass(frozen=True)
class Family:
    model_type: str  # HF config.json `model_type`
    summary: str  # one line: what sets this family apart
    build_block: Callable[[ModelConfig, int, ProbeRegistry], Block | V4Block]


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("deepseek_v2", v2.SUMMARY, v2.build_block),
    Family("deepseek_v3", v3.SUMMARY, v3.build_block),
    Family("deepseek_v32", v32.SUMMARY, v32.build_block),
    Family("deepseek_v4", v4.SUMMARY, v4.build_block),
)}


def family_for(model_type: str) -> Family:
    """The family of an HF `model_type`; ConfigError naming the known ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"model_type {model_type!r} has no model family here; known: {sorted(FAMILIES)}")
    return family


__all__ = ["FAMILIES", "Family", "family_for"]
