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
    (Controls(routing={2: RoutingControl(force=(16,))}), r"force names expert\(s\) \[16\] outside 0..15"),
    (Controls(routing={2: RoutingControl(ablate=(4, 4))}), "ablate lists an expert twice"),
    (Controls(routing={2: RoutingControl(topk_group=0)}), "topk_group=0 must be in 1..n_group=4"),
    (Controls(routing={1: RoutingControl(routed_scaling_factor=-1.0)}), "layer 1: routed_scaling_factor must be .* >= 0"),
])
def test_impossible_routing_settings_are_named(controls, message):
    with pytest.raises(ControlError, match=message):
        controls.validate(TINY)


FP32 = r"must be .*finite in float32"


@pytest.mark.parametrize(("rc", "message"), [
    # 1e39 is a fine float64 but inf in the model's float32, where it made NaN logits
    (RoutingControl(routed_scaling_factor=1e39), f"routed_scaling_factor {FP32}.*got 1e\\+39"),
    (RoutingControl(routed_scaling_factor=-1e39), f"routed_scaling_factor {FP32}"),
    (RoutingControl(routed_scaling_factor=float("inf")), f"routed_scaling_factor {FP32}.*got inf"),
    (RoutingControl(routed_scaling_factor=float("nan")), f"routed_scaling_factor {FP32}.*got nan"),
    (RoutingControl(temperature=1e39), r"temperature must be > 0 and finite in float32 .*got 1e\+39"),
    (RoutingControl(temperature=float("inf")), "temperature must be > 0 and finite in float32"),
    (RoutingControl(temperature=float("nan")), "temperature must be > 0 and finite in float32"),
    (RoutingControl(temperature=-0.5), "temperature must be > 0"),
    (RoutingControl(temperature=1e-46), r"temperature must be > 0 .*got 1e-46"),  # 0 in float32: logits / 0
    (RoutingControl(bias_offset={3: 1e39}), r"bias_offset values must be finite in float32 .*\{3: 1e\+39\}"),
    (RoutingControl(bias_offset={3: float("-inf")}), r"bias_offset values must be finite in float32 .*\{3: -inf\}"),
])
def test_float_fields_must_fit_float32(rc, message):
    with pytest.raises(ControlError, match=f"routing for layer 1: {message}"):
        Controls(routing={1: rc}).validate(TINY)
    with pytest.raises(ControlError, match=message):  # the "all" entry is checked in every MoE layer
        Controls(routing={"all": rc}).validate(TINY)


def test_float32_extremes_are_accepted_and_refused_values_never_reach_the_model(model, ids):
    for rc in (RoutingControl(routed_scaling_factor=3e38), RoutingControl(temperature=1.2e-38),
               RoutingControl(temperature=3e38), RoutingControl(bias_offset={0: -3e38, 1: 3e38})):
        Controls(routing={"all": rc}).validate(TINY)
    with pytest.raises(ControlError, match="routed_scaling_factor must be finite in float32"):
        model(ids, controls=Controls(routing={"all": RoutingControl(routed_scaling_factor=1e39)}))
    with pytest.raises(ControlError, match="routed_scaling_factor overflows float32"):
        RoutingControl(routed_scaling_factor=10**400)  # past float64 too: float() itself overflows


@pytest.mark.parametrize(("text", "message"), [
    ('{"routing": {"1": {"temperature": 1e400}}}', "temperature must be > 0 and finite in float32"),  # JSON's inf
    ('{"routing": {"1": {"routed_scaling_factor": NaN}}}', "routed_scaling_factor must be finite in float32"),
    ('{"routing": {"all": {"bias_offset": {"2": Infinity}}}}', "bias_offset values must be finite in float32"),
])
def test_json_infinities_are_refused_on_validation(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text).validate(TINY)


@pytest.mark.parametrize(("text", "message"), [
    ('{"routing": {"1": {"topk": 2}}}', r"unknown field\(s\) \['topk'\]"),
    ('{"routing": {"1": {"top_k": 2.5}}}', "top_k must be int, got 2.5"),
    ('{"routing": {"1": {"shared_experts": 0}}}', "shared_experts must be bool"),
    ('{"routing": {"1": {"ablate": "3"}}}', "ablate must be a list of expert ids"),
    ('{"routing": {"1": {"bias_offset": {"x": 1}}}}', "bias_offset must map expert -> offset"),
    # the layer is named, and every value is checked for its type, not converted
    ('{"routing": {"2": {"top_k": 2.5}}}', r"routing\[2\]: RoutingControl.top_k must be int"),
    ('{"routing": {"all": {"topk": 2}}}', r"routing\['all'\]: unknown field"),
    ('{"routing": {"1": {"ablate": 3}}}', r"routing\[1\]: routing ablate must be a list of expert ids, got 3"),
    ('{"routing": {"1": {"force": {"3": 1}}}}', "force must be a list of expert ids"),
    ('{"routing": {"1": {"bias_offset": [0.5]}}}', "bias_offset must map expert -> offset"),
    ('{"routing": {"1": {"bias_offset": {"1.9": 1}}}}', "'1.9' is not an expert id"),  # not rounded to expert 1
    ('{"routing": {"1": {"bias_offset": {"1": "0.5"}}}}', "expert 1 has '0.5', not a number"),
    ('{"routing": {"1": {"bias_offset": {"1": true}}}}', "expert 1 has True, not a number"),
    ('{"routing": {"1": {"temperature": "hot"}}}', "temperature must be a number"),
    ('{"routing": {"1": {"routed_scaling_factor": true}}}', "routed_scaling_factor must be a number"),
])
def test_bad_routing_json_is_named(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text)


def test_bias_offset_expert_keys_are_whole_numbers():
    assert RoutingControl(bias_offset={"7": 0.5, 2: 1}).bias_offset == {2: 1.0, 7: 0.5}
    for key in (1.9, True, "1.9", " 3"):
        with pytest.raises(ControlError, match="is not an expert id"):
            RoutingControl(bias_offset={key: 0.5})


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
