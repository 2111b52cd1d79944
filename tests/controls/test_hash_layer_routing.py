"""Routing controls on V4's hash-routed layers: an "all" entry reaches them with only the fields they can apply
(so `Controls.top_k(2)` means every learned layer), and a layer entry that would change a hash layer's selection is
refused when the controls are validated, naming the layer and the fields."""

from __future__ import annotations

import pytest
import torch

from workbench.config import ModelConfig
from workbench.controls import ControlError, Controls, RoutingControl
from workbench.model.transformer import DeepSeekModel

CFG = ModelConfig.from_name("tiny-v4")  # layer 0 hash-routed, 1-3 learned


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.random(CFG, seed=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))


def _expert_ids(model, ids, controls):
    got = {}
    with torch.no_grad(), model.probes.listen(["blocks.*.mlp.hook_expert_indices"],
                                              lambda n, v: got.__setitem__(int(n.split(".")[1]), v.clone())):
        logits = model(ids, controls=controls)
    return logits, got


@pytest.mark.parametrize("everywhere", [RoutingControl(top_k=2), RoutingControl(top_k=3, bias_offset={1: 0.5}),
                                        RoutingControl(force=(5,), temperature=2.0)])
def test_an_all_entry_equals_the_same_entry_on_the_learned_layers(model, ids, everywhere):
    learned = [layer for layer in CFG.moe_layers if not CFG.is_hash_layer(layer)]
    rest = everywhere.for_hash_layer()
    per_layer = Controls(routing={**dict.fromkeys(learned, everywhere), **({0: rest} if rest else {})})
    got, got_ids = _expert_ids(model, ids, Controls(routing={"all": everywhere}))
    want, want_ids = _expert_ids(model, ids, per_layer)
    assert torch.equal(got, want)
    assert torch.equal(got_ids[0], model.layers[0].mlp.gate.tid2eid[ids[0]])  # the table still decides
    assert all(torch.equal(got_ids[layer], want_ids[layer]) for layer in learned)
    if everywhere.top_k is not None:
        assert all(got_ids[layer].shape[-1] == everywhere.top_k for layer in learned)


def test_hash_layer_keeps_the_fields_it_can_apply():
    rc = RoutingControl(top_k=2, ablate=(3,), temperature=2.0, shared_experts=False, force=(1,))
    assert rc.for_hash_layer() == RoutingControl(ablate=(3,), temperature=2.0, shared_experts=False)
    assert RoutingControl(top_k=2).for_hash_layer() is None
    c = Controls(routing={"all": RoutingControl(top_k=2)})
    assert c.routing_for(0, CFG) is None and c.routing_for(1, CFG) == RoutingControl(top_k=2)
    assert c.first_difference(Controls(), CFG) == 1  # the hash layer is untouched: re-run from layer 1


@pytest.mark.parametrize("rc", [RoutingControl(top_k=2), RoutingControl(force=(1,)),
                                RoutingControl(bias_offset={0: 1.0})])
def test_a_selection_field_on_a_hash_layer_is_refused_at_validation(rc):
    with pytest.raises(ControlError, match=r"routing for layer 0: layer 0 is hash-routed .*tid2eid"):
        Controls(routing={0: rc}).validate(CFG)
    Controls(routing={0: RoutingControl(ablate=(2,), temperature=0.5)}).validate(CFG)  # these apply
