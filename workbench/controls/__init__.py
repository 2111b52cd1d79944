"""Controls: live interventions on routing and the MLA latent, as validated, JSON-serialisable data.

Design choices:
- Plain frozen dataclasses (`RoutingControl`, `LatentControl`, `Controls`) that know nothing about tensors, so a set
  of controls can be stored in trace attrs, sent from a widget, and compared to find the first layer a change touches.
- One module per component, each holding its control, its checks and its translation for the model:
  `keys` (ControlError, layer keys "all" / int), `routing` (RoutingControl), `latent` (LatentControl, svd_basis),
  `fp8_sites` (FP8 sites per layer), `replay` (RoutingReplay), `attention` (AttentionControl: the indexer's budget,
  dense attention, V4's window and compressed branch), `hash_table` (V4 tid2eid edits) and `container` (Controls:
  validate, resolve, JSON; also V4's mhc_identity and swiglu_limit).
  `container` imports the others; none of them imports it.

Shape legend: E routed experts, C kv_lora_rank, r kept latent directions, N calibration tokens.
"""

from workbench.controls.attention import AttentionControl
from workbench.controls.container import Controls
from workbench.controls.fp8_sites import fp8_layer_sites
from workbench.controls.keys import ControlError, LayerKey
from workbench.controls.latent import LatentBasis, LatentControl, svd_basis
from workbench.controls.replay import RoutingReplay
from workbench.controls.routing import RoutingControl

__all__ = [
    "AttentionControl",
    "ControlError",
    "Controls",
    "LatentBasis",
    "LatentControl",
    "LayerKey",
    "RoutingControl",
    "RoutingReplay",
    "fp8_layer_sites",
    "svd_basis",
]
