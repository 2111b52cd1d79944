"""vLLM's routed-experts array in and out."""

from __future__ import annotations

import re

import numpy as np
import pytest
from trace_helpers import corpus, in_memory

from workbench.trace import from_vllm_routed_experts, to_vllm_routed_experts

TEXTS = corpus(12, seed=3)


def test_vllm_routed_experts_round_trip(loaded):
    ds = in_memory(loaded, TEXTS[:4])
    routed = to_vllm_routed_experts(ds)
    cfg = loaded.model.config
    assert routed.dtype == np.int16 and routed.shape == (ds.sizes["token"], len(cfg.moe_layers), cfg.num_experts_per_tok)
    back = from_vllm_routed_experts(routed, moe_layers=cfg.moe_layers, token_ids=ds.token_id.values,
                                    n_experts=cfg.n_routed_experts)
    np.testing.assert_array_equal(back.expert_ids.values, ds.expert_ids.values)
    assert list(back.layer.values) == list(cfg.moe_layers)
    partial = in_memory(loaded, TEXTS[:2], ["blocks.1.mlp.hook_expert_indices"])
    left_out = [layer for layer in cfg.moe_layers if layer != 1]
    with pytest.raises(ValueError, match=rf"layers {re.escape(str(left_out))} were not captured"):
        to_vllm_routed_experts(partial)
    with pytest.raises(ValueError, match="tokens, moe_layers, top_k"):
        from_vllm_routed_experts(routed[0])
