"""Routing controls: the messages for impossible or malformed settings, and how the router and model obey them."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.controls import ControlError, Controls, RoutingControl
from workbench.model.routing import RoutingParams, route

TINY = PRESETS["tiny"]  # 3 layers, layer 0 dense, MoE layers 1-2; 16 experts in 4 groups, top-4 from 2 groups; C = 32


@pytest.mark.parametrize(("controls", "message"), [
    (Controls(routing={7: RoutingControl(top_k=2)}), r"routing\[7\]: unknown layer; the model has layers 0..2"),
    (Controls(routing={0: RoutingControl(top_k=2)}), r"layer 0 is a dense layer with no router; MoE layers: \[1, 2\]"),
    (Controls(routing={1: RoutingControl(top_k=0)}), r"layer 1: top_k=0 must be in 1..16"),
    (Controls(routing={"all": RoutingControl(top_k=15, ablate=(0, 1))}), r"top_k=15 must be in 1..14 .*2 ablated"),
    (Controls(routing={2: RoutingControl(ablate=tuple(range(16)))}), "every expert is ablated"),
    (Controls(routing={2: RoutingControl(ablate=(3,), force=(3,))}), r"expert\(s\) \[3\] are both forced and ablated"),
    (Controls(routing={2: RoutingControl(force=(1, 2, 3, 4, 5))}), "5 forced experts do not fit in top_k=4"),
    (Controls(routing={2: RoutingControl(ablate=(16,))}), r"ablate names expert\(s\) \[16\] outside 0..15"),
    (Controls(routing={2: RoutingControl(force=(1, 1))}), "force lists an expert twice"),
    (Controls(routing={2: RoutingControl(topk_group=5)}), "topk_group=5 must be in 1..n_group=4"),
    (Controls(routing={2: RoutingControl(ablate=(0, 1, 2, 4, 5, 6))}), "groups could hold only 2 free experts"),
    (Controls(routing={2: RoutingControl(temperature=0.0)}), "temperature must be > 0"),
    (Controls(routing={2: RoutingControl(bias_offset={20: 1.0})}), r"bias_offset names expert\(s\) \[20\]"),
    (Controls(routing={2: RoutingControl(bias_offset={2: float("nan")})}), "bias_offset values must be finite"),
])
def test_impossible_routing_settings_are_named(controls, message):
    with pytest.raises(ControlError, match=message):
        controls.validate(TINY)


@pytest.mark.parametrize(("text", "message"), [
    ('{"routing": {"1": {"topk": 2}}}', r"unknown field\(s\) \['topk'\]"),
    ('{"routing": {"1": {"top_k": 2.5}}}', "top_k must be int, got 2.5"),
    ('{"routing": {"1": {"shared_experts": 0}}}', "shared_experts must be bool"),
    ('{"routing": {"1": {"ablate": "3"}}}', "ablate must be a list of expert ids"),
    ('{"routing": {"1": {"bias_offset": {"x": 1}}}}', "bias_offset must map expert -> offset"),
])
def test_bad_routing_json_is_named(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text)


def test_forced_and_ablated_experts_in_route():
    logits = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))  # [T, E]
    p = RoutingParams(4, 4, 2, "noaux_tc", "sigmoid", True, 2.5)
    mask = torch.ones(16, dtype=torch.bool)
    mask[[0, 5, 9]] = False
    _, ids, weights = route(logits, torch.zeros(16), p, mask=mask, force=torch.tensor([12, 3]))
    assert torch.equal(ids[:, :2], torch.tensor([[12, 3]]).expand(300, 2))
    assert not torch.isin(ids, torch.tensor([0, 5, 9])).any()
    assert all(len(set(row.tolist())) == 4 for row in ids)  # no expert twice
    torch.testing.assert_close(weights.sum(-1), torch.full((300,), 2.5))


def test_each_routing_control_changes_the_output(model, ids):
    ref = model(ids)
    for rc in (RoutingControl(top_k=1), RoutingControl(temperature=3.0), RoutingControl(shared_experts=False),
               RoutingControl(routed_scaling_factor=0.0), RoutingControl(norm_topk_prob=False),
               RoutingControl(topk_group=1), RoutingControl(bias_offset=dict.fromkeys(range(8), 1.0))):
        out = model(ids, controls=Controls(routing={"all": rc}).resolve(TINY))
        assert not torch.allclose(out, ref), rc
