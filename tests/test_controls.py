"""Controls: validation messages, JSON round trips, per-layer merging, and how the model obeys them."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS
from workbench.controls import ControlError, Controls, LatentControl, RoutingControl, svd_basis
from workbench.model.moe import RoutingParams, route
from workbench.model.transformer import DeepSeekModel

TINY = PRESETS["tiny"]  # 3 layers, layer 0 dense, MoE layers 1-2; 16 experts in 4 groups, top-4 from 2 groups; C = 32


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.random(TINY, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 258, (1, 12), generator=torch.Generator().manual_seed(0))


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
    (Controls(latent={0: LatentControl(33)}), r"latent\[0\].rank=33 must be in 1..kv_lora_rank=32"),
    (Controls(latent={"all": LatentControl(0)}), r"latent\['all'\].rank=0"),
    (Controls(latent={3: LatentControl(4)}), r"latent\[3\]: unknown layer"),
    (Controls(latent={0: LatentControl(4, "pca")}), "basis must be 'svd' or 'raw'"),  # type: ignore[arg-type]
])
def test_impossible_settings_are_named(controls, message):
    with pytest.raises(ControlError, match=message):
        controls.validate(TINY)


@pytest.mark.parametrize(("text", "message"), [
    ('{"routing": {"1": {"topk": 2}}}', r"unknown field\(s\) \['topk'\]"),
    ('{"routing": {"first": {"top_k": 2}}}', "layer key must be an int or 'all'"),
    ('{"fp9": {}}', r"unknown section\(s\) \['fp9'\]"),
    ("{not json", "not valid JSON"),
    ('{"routing": {"1": {"top_k": 2.5}}}', "top_k must be int, got 2.5"),
    ('{"routing": {"1": {"shared_experts": 0}}}', "shared_experts must be bool"),
    ('{"routing": {"1": {"ablate": "3"}}}', "ablate must be a list of expert ids"),
    ('{"routing": {"1": {"bias_offset": {"x": 1}}}}', "bias_offset must map expert -> offset"),
    ('{"latent": {"0": {"rank": "8"}}}', "rank must be int"),
])
def test_bad_json_is_named(text, message):
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


def test_no_controls_and_neutral_controls_are_the_default_path(model, ids):
    ref = model(ids)
    assert torch.equal(model(ids, controls={}), ref)
    assert torch.equal(model(ids, controls=Controls().resolve(TINY)), ref)
    neutral = Controls(routing={"all": RoutingControl(top_k=4, temperature=1.0, shared_experts=True)},
                       latent={"all": LatentControl(32, "raw")})
    assert torch.equal(model(ids, controls=neutral.resolve(TINY)), ref)


def test_each_routing_control_changes_the_output(model, ids):
    ref = model(ids)
    for rc in (RoutingControl(top_k=1), RoutingControl(temperature=3.0), RoutingControl(shared_experts=False),
               RoutingControl(routed_scaling_factor=0.0), RoutingControl(norm_topk_prob=False),
               RoutingControl(topk_group=1), RoutingControl(bias_offset=dict.fromkeys(range(8), 1.0))):
        out = model(ids, controls=Controls(routing={"all": rc}).resolve(TINY))
        assert not torch.allclose(out, ref), rc


def test_latent_truncation(model, ids):
    latents = torch.randn(40, 32, generator=torch.Generator().manual_seed(5)) @ torch.randn(32, 32)  # [N, C]
    basis = svd_basis(latents)  # [C, C]
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), atol=1e-5, rtol=0)
    c = Controls(latent={0: LatentControl(8)})
    with pytest.raises(ControlError, match="basis 'svd' needs a calibration run"):
        c.resolve(TINY)
    resolved = c.resolve(TINY, svd_bases={0: basis})
    assert resolved[0].latent_basis is not None and resolved[0].latent_basis.shape == (32, 8)
    assert not torch.allclose(model(ids, controls=resolved), model(ids))
    full = Controls(latent={"all": LatentControl(32)}).resolve(TINY, svd_bases=dict.fromkeys(range(3), basis))
    torch.testing.assert_close(model(ids, controls=full), model(ids), atol=1e-4, rtol=1e-4)  # a full basis is a rotation


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
