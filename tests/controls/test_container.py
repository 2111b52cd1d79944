"""Controls (the container): JSON round trips, layer keys, per-layer merging, first difference, the default path."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.controls import ControlError, Controls, LatentControl, RoutingControl

TINY = PRESETS["tiny"]  # 3 layers, layer 0 dense, MoE layers 1-2; 16 experts in 4 groups, top-4 from 2 groups; C = 32


def test_json_round_trip_and_layer_keys():
    c = Controls(routing={"all": RoutingControl(top_k=2, temperature=0.5),
                          "2": RoutingControl(ablate=[3], force=(5,), bias_offset={"7": 0.25}, shared_experts=False)},
                 latent={0: LatentControl(8, "raw"), "all": LatentControl(16)})
    assert list(c.routing) == ["all", 2] and c.routing[2].ablate == (3,) and c.routing[2].bias_offset == {7: 0.25}
    assert Controls.from_json(c.to_json()) == c
    assert Controls.from_dict(c.to_dict()) == c
    assert Controls.from_json("{}") == Controls()


def test_layer_entry_overrides_all_field_by_field():
    c = Controls(routing={"all": RoutingControl(top_k=2, temperature=0.5), 2: RoutingControl(top_k=3)},
                 latent={"all": LatentControl(16), 1: LatentControl(4, "raw")})
    assert c.routing_for(1) == RoutingControl(top_k=2, temperature=0.5)
    assert c.routing_for(2) == RoutingControl(top_k=3, temperature=0.5)
    assert c.latent_for(0) == LatentControl(16) and c.latent_for(1) == LatentControl(4, "raw")


def test_first_difference_finds_the_first_touched_layer():
    base = Controls(routing={1: RoutingControl(top_k=2)})
    assert base.first_difference(base, TINY) == 3
    assert Controls(routing={1: RoutingControl(top_k=2), 2: RoutingControl(ablate=(0,))}).first_difference(base, TINY) == 2
    assert Controls(latent={0: LatentControl(4)}).first_difference(base, TINY) == 0
    # the same effect spelled differently touches nothing ("all" does not reach the dense layer 0)
    per_layer = Controls(routing={1: RoutingControl(top_k=2), 2: RoutingControl(top_k=2)})
    assert Controls(routing={"all": RoutingControl(top_k=2)}).first_difference(per_layer, TINY) == 3


@pytest.mark.parametrize(("text", "message"), [
    ('{"routing": {"first": {"top_k": 2}}}', "layer key must be an int or 'all'"),
    ('{"fp9": {}}', r"unknown section\(s\) \['fp9'\]"),
    ("{not json", "not valid JSON"),
])
def test_bad_json_is_named(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text)


def test_no_controls_and_neutral_controls_are_the_default_path(model, ids):
    ref = model(ids)
    assert torch.equal(model(ids, controls={}), ref)
    assert torch.equal(model(ids, controls=Controls().resolve(TINY)), ref)
    neutral = Controls(routing={"all": RoutingControl(top_k=4, temperature=1.0, shared_experts=True)},
                       latent={"all": LatentControl(32, "raw")})
    assert torch.equal(model(ids, controls=neutral.resolve(TINY)), ref)
