"""FP8 controls: layer keys and site names in JSON, their resolution to each layer's sites, and a run of the model."""

from __future__ import annotations

import torch

from workbench.config import PRESETS
from workbench.controls import Controls

TINY = PRESETS["tiny"]  # 3 layers, layer 0 dense, MoE layers 1-2; 16 experts in 4 groups, top-4 from 2 groups; C = 32


def test_fp8_controls_json_layers_and_resolution():
    c = Controls(fp8={"all": [], "2": ["experts", "attn"], 0: "all"})
    assert list(c.fp8) == ["all", 0, 2] and c.fp8[2] == ("attn", "experts")
    assert Controls.from_json(c.to_json()) == c and Controls.from_dict(c.to_dict()) == c
    assert c.fp8_for(1) == () and c.fp8_for(2) == ("attn", "experts")
    resolved = c.resolve(TINY)
    assert resolved[1].fp8_sites == frozenset()  # high precision everywhere in layer 1
    assert resolved[0].fp8_sites == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "mlp"}
    assert resolved[2].fp8_sites == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "experts"}
    # FP8 changes count for the incremental re-run; equal sets spelled differently do not
    assert Controls(fp8={2: ["experts"]}).first_difference(Controls(), TINY) == 2
    assert Controls(fp8={1: ["experts"]}).first_difference(Controls(fp8={1: ("experts",)}), TINY) == TINY.num_hidden_layers


def test_fp8_on_a_run_of_the_model_changes_only_the_named_layer(model, ids):
    plain = model(ids)
    controls = Controls(fp8={2: ["experts"]}).resolve(TINY)
    res: list[torch.Tensor] = []
    base: list[torch.Tensor] = []
    with torch.no_grad():
        first = model.forward_from(0, model.embed_tokens(ids), controls=controls, residuals=res)
        model.forward_from(0, model.embed_tokens(ids), residuals=base)
    assert not torch.equal(first, plain)
    assert all(torch.equal(a, b) for a, b in zip(res[:3], base[:3], strict=True))  # layers 0-2 inputs unchanged
    assert torch.equal(model(ids), plain)  # nothing stays switched on
