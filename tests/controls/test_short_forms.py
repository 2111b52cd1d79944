"""The one-line forms of common interventions, `|` to combine them, and unresolved controls in a bare forward."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.controls import ControlError, Controls, LatentControl, RoutingControl


def test_short_forms_equal_the_long_forms() -> None:
    assert Controls.ablate({2: [3]}) == Controls(routing={2: RoutingControl(ablate=(3,))})
    assert Controls.ablate([3, 5]) == Controls(routing={"all": RoutingControl(ablate=(3, 5))})
    assert Controls.force({1: [7]}) == Controls(routing={1: RoutingControl(force=(7,))})
    assert Controls.top_k(2) == Controls(routing={"all": RoutingControl(top_k=2)})
    assert Controls.top_k(1, layers=[1, 2]) == Controls(routing={1: RoutingControl(top_k=1), 2: RoutingControl(top_k=1)})
    assert Controls.bias({2: {3: 0.5}}) == Controls(routing={2: RoutingControl(bias_offset={3: 0.5})})
    assert Controls.latent_rank(8) == Controls(latent={"all": LatentControl(8)})
    assert Controls.latent_rank(4, layers=0, basis="raw") == Controls(latent={0: LatentControl(4, "raw")})


def test_or_combines_field_by_field_the_right_side_winning() -> None:
    both = Controls.ablate({2: [3]}) | Controls.top_k(2, layers=2) | Controls.latent_rank(8)
    assert both == Controls(routing={2: RoutingControl(ablate=(3,), top_k=2)}, latent={"all": LatentControl(8)})
    assert (Controls.top_k(2) | Controls.top_k(3)).routing["all"].top_k == 3
    assert Controls.from_json(both.to_json()) == both


@pytest.mark.parametrize("bad", [{2: 3}, "3", {2: "3"}])
def test_bad_short_forms_say_what_was_wrong(bad) -> None:
    with pytest.raises(ControlError, match="Controls.ablate"):
        Controls.ablate(bad)


def test_a_bare_forward_takes_unresolved_controls(model) -> None:
    layer = model.config.moe_layers[0]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    short = Controls.ablate({layer: [0, 1]}) | Controls.top_k(1)
    with torch.no_grad():
        got = model(ids, controls=short)
        want = model(ids, controls=short.resolve(model.config))
        plain = model(ids)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert torch.equal(model.generate(ids, 4, controls=short), model.generate(ids, 4, controls=short.resolve(model.config)))
    with pytest.raises(ControlError, match="dense layer"):
        model(ids, controls=Controls.ablate({0: [1]}))  # layer 0 of the tiny preset is dense


def test_the_front_door_has_the_short_forms() -> None:
    assert wb.Controls is Controls and wb.Controls.ablate({2: [3]}).routing[2].ablate == (3,)
