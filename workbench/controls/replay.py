"""Routing replay: the experts and weights a trace recorded for one sequence, forced on a new run.

Design choices:
- Routing replay (`Controls.replay(store, seq=...)`): the experts and the fp32 weights a trace recorded for one
  sequence are used as they are, never recomputed, so a replay reproduces the recorded forward bit for bit.
- A replayed layer takes no other routing control (only `shared_experts`), and the recording model's config must be
  this model's: `_check_replay` says which layer or field stands in the way.

Shape legend: S tokens of the sequence, L MoE layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.config import ModelConfig
from workbench.controls.keys import ControlError, _integral, _need_mapping
from workbench.controls.routing import RoutingControl

if TYPE_CHECKING:
    import xarray as xr


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
    checkpoint: str = ""  # the recording model's digest (trace attr `checkpoint`; "" when the trace has none)

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
                   str(ds.attrs.get("model_config", "")), "" if isinstance(trace, xr.Dataset) else str(trace), seq,
                   str(ds.attrs.get("checkpoint", "")))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seq": self.seq, "layers": sorted(self.expert_ids)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingReplay:
        d = _need_mapping(d, "replay", "an object {source, seq, layers}")
        unknown = sorted(set(d) - {"source", "seq", "layers"}, key=str)
        if unknown:
            raise ControlError(f"replay: unknown field(s) {unknown}; known: ['layers', 'seq', 'source']")
        if not d.get("source"):
            raise ControlError("replay: recorded from an in-memory trace, so JSON cannot bring it back; "
                               "replay from a store path")
        source, seq, layers = d["source"], d.get("seq", 0), d.get("layers")
        if not isinstance(source, str):
            raise ControlError(f"replay.source must be a store path, got {source!r}")
        if _integral(seq) is None or isinstance(seq, str):
            raise ControlError(f"replay.seq must be an int, got {seq!r}")
        if layers is not None and (not isinstance(layers, list) or any(_integral(v) is None or isinstance(v, str)
                                                                       for v in layers)):
            raise ControlError(f"replay.layers must be a list of MoE layers, got {layers!r}")
        return cls.from_trace(source, int(seq), layers)


def _check_replay(replay: RoutingReplay, config: ModelConfig,
                  routing_for: Callable[[int], RoutingControl | None], checkpoint: str | None = None) -> None:
    """Raise ControlError unless `replay` fits this model; `routing_for` gives a layer's effective routing control.

    `checkpoint` (the running model's digest, when known) must equal the recording one: a fine-tune of the same
    config routes differently, so its trace is not this model's routing.
    """
    where = f"replay of {replay.source or 'an in-memory trace'} (seq {replay.seq})"
    if checkpoint and replay.checkpoint and checkpoint != replay.checkpoint:
        raise ControlError(f"{where}: recorded with another checkpoint (digest {replay.checkpoint}, this model is "
                           f"{checkpoint})")
    ours = json.dumps(config.to_hf_dict(), sort_keys=True)
    if replay.model_config and json.loads(replay.model_config) != json.loads(ours):
        raise ControlError(f"{where}: recorded with another model (its config differs from this model's)")
    E = config.n_routed_experts
    for layer, ids in replay.expert_ids.items():
        if not config.is_moe_layer(layer):
            raise ControlError(f"{where}: layer {layer} is not an MoE layer of this model")
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < E):
            raise ControlError(f"{where}: layer {layer} names experts outside 0..{E - 1}")
        rc = routing_for(layer)
        clash = sorted(k for k, v in (rc.to_dict() if rc else {}).items() if k != "shared_experts")
        if clash:
            raise ControlError(f"{where}: layer {layer} is replayed, so routing fields {clash} cannot apply there")
