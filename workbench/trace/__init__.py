"""Trace capture and the on-disk trace store: record routing, latents and next-token statistics, keep them in
zarr, read them back lazily with xarray. See docs/trace-schema.md for the schema."""

import sys
import types
from typing import Any

from workbench.trace.dense_topk import dense_attention_topk
from workbench.trace.reader import migrate_store, open_trace
from workbench.trace.recorder import Trace, select, trace
from workbench.trace.schema import SCHEMA_VERSION, VARIABLES, Layout, SchemaError
from workbench.trace.store import TraceStore
from workbench.trace.vllm import from_vllm_routed_experts, to_vllm_routed_experts
from workbench.trace.zarr_io import TraceStoreError

__all__ = [
    "SCHEMA_VERSION",
    "VARIABLES",
    "Layout",
    "SchemaError",
    "Trace",
    "TraceStore",
    "TraceStoreError",
    "dense_attention_topk",
    "from_vllm_routed_experts",
    "migrate_store",
    "open_trace",
    "select",
    "to_vllm_routed_experts",
    "trace",
]


class _CallableModule(types.ModuleType):
    """`workbench.trace` is both this package and the recorder's entry point: importing a subpackage rebinds
    the parent's attribute to the module, so the module itself is made callable rather than shadowed."""

    def __call__(self, model: Any, sites: Any = None, **kwargs: Any) -> Trace:
        return trace(model, sites, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
