"""The views: routing explorer, expert specialisation, KV compression, FP8 error, live tuner, sparse attention and
mHC, each an ipywidgets widget, and `Workbench`, the dashboard that puts them on one shared live session.
`workbench serve` shows the same dashboard as a standalone Panel app (workbench/widgets/app.py)."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it; imported on first use so `import workbench.widgets` stays cheap
_LAZY = {
    "Workbench": "workbench.widgets.dashboard",
    "RoutingExplorer": "workbench.widgets.routing",
    "ExpertSpecialisation": "workbench.widgets.specialisation",
    "KVCompression": "workbench.widgets.kv_compression",
    "FP8Error": "workbench.widgets.fp8_error",
    "LiveTuner": "workbench.widgets.tuner",
    "SparseAttention": "workbench.widgets.sparse_attention",
    "HyperConnections": "workbench.widgets.hyper_connections",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
