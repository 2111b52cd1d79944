"""vLLM's routed-experts array in and out."""

from __future__ import annotations

import base64
import io
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


def test_from_vllm_routed_experts_reads_every_released_array_form(loaded):
    ds = in_memory(loaded, TEXTS[:3])
    cfg = loaded.model.config
    routed = to_vllm_routed_experts(ds)  # [N, L, k]
    model = {"moe_layers": cfg.moe_layers, "n_experts": cfg.n_routed_experts, "n_layers": cfg.num_hidden_layers,
             "token_ids": ds.token_id.values}
    every = np.zeros((len(routed), cfg.num_hidden_layers, cfg.num_experts_per_tok), dtype=np.int16)  # [N, A, k]
    every[:, list(cfg.moe_layers)] = routed  # dense layers: all-zero placeholders (vLLM 0.20.x)
    buf = io.BytesIO()
    np.save(buf, routed)
    for form in (every, every.tolist(), base64.b64encode(buf.getvalue()).decode()):
        back = from_vllm_routed_experts(form, **model)
        np.testing.assert_array_equal(back.expert_ids.values, ds.expert_ids.values)
        assert back.sizes["layer_all"] == cfg.num_hidden_layers
    cached = routed.copy()
    cached[:2] = -1  # prefix-cached positions (vLLM 0.21)
    back = from_vllm_routed_experts(cached.tolist(), **model)
    np.testing.assert_array_equal(to_vllm_routed_experts(back, allow_uncaptured=True), cached)
    with pytest.raises(ValueError, match="layers \\[1, 2, 3\\] were not captured"):
        to_vllm_routed_experts(back)
    preempted = from_vllm_routed_experts(None, **model, top_k=cfg.num_experts_per_tok)
    assert (preempted.expert_ids.values == -1).all() and preempted.expert_ids.shape == ds.expert_ids.shape
    with pytest.raises(ValueError, match="pass token_ids, moe_layers and top_k"):
        from_vllm_routed_experts(None, moe_layers=cfg.moe_layers)
    every[0, 0, 0] = 3  # a dense layer holding an expert id: not this model's array
    with pytest.raises(ValueError, match="layer 0 is dense in this model"):
        from_vllm_routed_experts(every, **model)
