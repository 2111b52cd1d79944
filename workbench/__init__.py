"""MoE Workbench: a Jupyter-native research workbench for DeepSeek-style MoE + MLA models."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `import workbench` stays cheap
_LAZY = {"trace": "workbench.trace", "open_trace": "workbench.trace.reader", "load_model": "workbench.loader"}


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext workbench`: the magics of workbench/magics.py, imported only then."""
    importlib.import_module("workbench.magics").load_ipython_extension(ipython)


def __getattr__(name: str) -> Any:
    if name == "trace":  # the callable package itself (see workbench/trace/__init__.py)
        return importlib.import_module("workbench.trace")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
