"""Trace capture and the on-disk trace store: record routing, latents and next-token statistics, keep them in
zarr, read them back lazily with xarray. See docs/trace-schema.md for the schema."""

import sys
import types
from typing import Any

from workbench.trace.dense_topk import dense_attention_topk
from workbench.trace.reader import migrate_store, open_trace
from workbench.trace.recorder import Trace, select, trace
from workbench.trace.routing_import import (
    RequestRouting,
    RoutingImportError,
    decode_routed_experts,
    decode_sglang_routed_experts,
    iter_jsonl_routing,
    normalize_routed_experts,
    sglang_request_routing,
    vllm_request_routing,
)
from workbench.trace.schema import SCHEMA_VERSION, VARIABLES, Layout, SchemaError
from workbench.trace.store import TraceStore
from workbench.trace.vllm import from_vllm_routed_experts, to_vllm_routed_experts
from workbench.trace.zarr_io import TraceStoreError

__all__ = [
    "SCHEMA_VERSION",
    "VARIABLES",
    "Layout",
    "RequestRouting",
    "RoutingImportError",
    "SchemaError",
    "Trace",
    "TraceStore",
    "TraceStoreError",
    "decode_routed_experts",
    "decode_sglang_routed_experts",
    "dense_attention_topk",
    "from_vllm_routed_experts",
    "iter_jsonl_routing",
    "migrate_store",
    "normalize_routed_experts",
    "open_trace",
    "select",
    "sglang_request_routing",
    "to_vllm_routed_experts",
    "trace",
    "vllm_request_routing",
]


class _CallableModule(types.ModuleType):
    """`workbench.trace` is both this package and the recorder's entry point: importing a subpackage rebinds
    the parent's attribute to the module, so the module itself is made callable rather than shadowed."""

    def __call__(self, model: Any, sites: Any = None, **kwargs: Any) -> Trace:
        return trace(model, sites, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
