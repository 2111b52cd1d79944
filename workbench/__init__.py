"""MoE Workbench: a Jupyter-native research workbench for DeepSeek-style MoE + MLA models.

The front door: `import workbench as wb` gives everything a user needs, each name imported on first use (so
`import workbench` stays cheap and imports neither Triton nor the widget stack):

    loaded = wb.load_model("default")                     # model + tokenizer (device="cpu" | "cuda" | "mps" | "auto")
    logits = loaded.model(ids, controls=wb.Controls.ablate({2: [3]}))
    with wb.trace(loaded.model, sites=["expert_ids"]) as t: ...
    ds = wb.open_trace("corpus.zarr")
    wb.Session(loaded.model, "def f(x):", loaded.tokenizer).apply(wb.Controls.top_k(2))
    wb.Workbench(loaded)                                  # the dashboard in a notebook

See README.md ("The front door") for every name.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # models and checkpoints
    "load_model": "workbench.loader",
    "LoadedModel": "workbench.loader",
    "ModelConfig": "workbench.config",
    "DeepSeekModel": "workbench.model.transformer",
    "load_checkpoint": "workbench.checkpoint",
    "save_checkpoint": "workbench.checkpoint",
    "enable_fp8": "workbench.model.fp8",
    "disable_fp8": "workbench.model.fp8",
    "set_backend": "workbench.model.backend",
    "set_reference_quant": "workbench.model.v4.attention",  # DeepSeek's V4 KV FP8 / indexer FP4 simulations
    "parameter_counts": "workbench.model.costs",
    "kv_bytes_per_token": "workbench.model.costs",
    "estimate_flops": "workbench.model.costs",
    # interventions and live sessions
    "Controls": "workbench.controls",
    "RoutingControl": "workbench.controls",
    "LatentControl": "workbench.controls",
    "AttentionControl": "workbench.controls",
    "Session": "workbench.session",
    "Workbench": "workbench.widgets.dashboard",
    # traces
    "open_trace": "workbench.trace.reader",
    # errors
    "ConfigError": "workbench.config",
    "CheckpointError": "workbench.checkpoint",
    "BundledModelError": "workbench.loader",
    "TokenizerError": "workbench.tokenizer",
    "ControlError": "workbench.controls",
    "KernelUnavailableError": "workbench_kernels._runtime",
    "SchemaError": "workbench.trace.schema",
    "TraceStoreError": "workbench.trace.zarr_io",
    "TraceMismatchError": "workbench.widgets.trace_source",
}
_MODULES = {"trace": "workbench.trace", "analysis": "workbench.analysis"}  # `wb.trace(...)` is the callable package

__all__ = sorted([*_LAZY, *_MODULES, "__version__"])


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext workbench`: the magics of workbench/magics.py, imported only then."""
    importlib.import_module("workbench.magics").load_ipython_extension(ipython)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
