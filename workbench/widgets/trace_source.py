"""Where a view's routing comes from: a stored trace (a store path or a Dataset) or the live session's prompt.

A stored trace is checked against the loaded model before any view uses it, so a store recorded with another
model (its config or checkpoint digest differs) is refused with both named, instead of drawing expert ids that
mean nothing for this model.
"""

from __future__ import annotations

import json
from pathlib import Path

import xarray as xr

from workbench.loader import LoadedModel
from workbench.trace.reader import open_trace


class TraceMismatchError(ValueError):
    """A trace that does not belong to the loaded model (or lacks what a view needs)."""


def load_trace(trace: str | Path | xr.Dataset) -> xr.Dataset:
    """A trace Dataset from a store path (opened lazily) or a Dataset given as is."""
    if isinstance(trace, xr.Dataset):
        return trace
    if isinstance(trace, (str, Path)):
        return open_trace(trace)
    raise TypeError(f"trace must be a trace store path or an xarray Dataset, got {type(trace).__name__}")


def check_trace_matches(ds: xr.Dataset, loaded: LoadedModel, where: str = "trace") -> None:
    """Raise TraceMismatchError unless `ds` was recorded with `loaded`'s config (and checkpoint, when both say)."""
    if "expert_ids" not in ds:
        raise TraceMismatchError(f"{where}: the trace has no expert_ids (routing was not recorded)")
    stored = ds.attrs.get("model_config")
    ours = loaded.model.config.to_hf_dict()
    if stored is not None:
        theirs = json.loads(stored) if isinstance(stored, str) else dict(stored)
        if theirs != json.loads(json.dumps(ours, sort_keys=True)):
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise TraceMismatchError(f"{where} was recorded with another model: config fields {diff[:6]} differ "
                                     f"from the loaded model {loaded.name!r}")
    digest = ds.attrs.get("checkpoint")
    if digest and digest != loaded.digest:
        raise TraceMismatchError(f"{where} was recorded with checkpoint {digest!r}, the loaded model "
                                 f"{loaded.name!r} is {loaded.digest!r}")
    layers = [int(x) for x in ds["layer"].values]
    if layers != list(loaded.model.config.moe_layers):
        raise TraceMismatchError(f"{where}: its MoE layers {layers} are not the loaded model's "
                                 f"{list(loaded.model.config.moe_layers)}")
