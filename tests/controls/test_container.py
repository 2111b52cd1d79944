"""Controls (the container): JSON round trips, layer keys, per-layer merging, first difference, the default path."""

from __future__ import annotations

import re

import numpy as np
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
    ('{"routing": {"first": {"top_k": 2}}}', "routing: layer key must be an int or 'all'"),
    ('{"fp9": {}}', r"unknown section\(s\) \['fp9'\]"),
    ("{not json", "not valid JSON"),
    # the wrong JSON type at every level is named where it is (no AttributeError from deep inside)
    ("[1, 2]", r"controls must be an object with sections .*, got list \[1, 2\]"),
    ('"routing"', "controls must be an object .*, got str"),
    ("5", "controls must be an object .*, got int"),
    ("null", "controls must be an object .*, got NoneType"),
    ('{"routing": [1]}', r"controls\['routing'\] must be an object of layer \(or 'all'\) -> routing control, got list"),
    ('{"routing": null}', r"controls\['routing'\] must be an object"),
    ('{"routing": {"2": [1]}}', r"routing\[2\] must be an object of routing fields, got list \[1\]"),
    ('{"routing": {"all": 3}}', r"routing\['all'\] must be an object of routing fields, got int"),
    ('{"latent": [8]}', r"controls\['latent'\] must be an object"),
    ('{"latent": {"0": 8}}', r"latent\[0\] must be an object \{rank, basis\}, got int 8"),
    ('{"latent": {"0": [8, "svd"]}}', r"latent\[0\] must be an object"),
    ('{"fp8": [1]}', r"fp8 must map layer \(or 'all'\) -> sites, got \[1\]"),
    ('{"fp8": "all"}', "fp8 must map layer"),
    ('{"fp8": {"1.5": "all"}}', "fp8: layer key must be an int or 'all'"),
    ('{"replay": [1]}', r"replay must be an object \{source, seq, layers\}, got list"),
    ('{"replay": "run.zarr"}', "replay must be an object"),
    ('{"replay": {"source": "run.zarr", "sq": 0}}', r"replay: unknown field\(s\) \['sq'\]"),
    ('{"replay": {"source": 5}}', "replay.source must be a store path, got 5"),
    ('{"replay": {"source": "run.zarr", "seq": 1.5}}', "replay.seq must be an int, got 1.5"),
    ('{"replay": {"source": "run.zarr", "seq": "0"}}', "replay.seq must be an int, got '0'"),
    ('{"replay": {"source": "run.zarr", "layers": 1}}', "replay.layers must be a list of MoE layers, got 1"),
    ('{"replay": {"source": "run.zarr", "layers": [1.5]}}', "replay.layers must be a list of MoE layers"),
])
def test_bad_json_is_named(text, message):
    with pytest.raises(ControlError, match=message):
        Controls.from_json(text)


def test_from_dict_and_from_json_check_what_they_are_given():
    with pytest.raises(ControlError, match="controls must be an object .*, got list"):
        Controls.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ControlError, match="from_json takes JSON text, got dict; use from_dict"):
        Controls.from_json({"routing": {}})  # type: ignore[arg-type]
    assert Controls.from_json(b'{"routing": {"1": {"top_k": 2}}}') == Controls(routing={1: RoutingControl(top_k=2)})


GOOD_KEYS = [(1, 1), ("1", 1), ("all", "all"), (np.int64(2), 2), ("-1", -1)]  # -1: validate says "unknown layer"
BAD_KEYS = [1.9, "1.9", True, False, None, 2.0, " 3", "1e0", "All", (1,)]


@pytest.mark.parametrize(("key", "want"), GOOD_KEYS)
def test_integral_layer_keys_are_accepted(key, want):
    c = Controls(routing={key: RoutingControl(top_k=2)}, latent={key: LatentControl(8)}, fp8={key: []})
    assert list(c.routing) == list(c.latent) == list(c.fp8) == [want]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize(("build", "where"), [
    (lambda k: Controls(routing={k: RoutingControl(top_k=2)}), "routing"),
    (lambda k: Controls(latent={k: LatentControl(8)}), "latent"),
    (lambda k: Controls(fp8={k: ["experts"]}), "fp8"),
    (lambda k: Controls.top_k(2, layers=[k]), "routing"),
    (lambda k: Controls.ablate({k: [1]}), "routing"),
])
def test_non_integral_layer_keys_are_refused_not_rounded(key, build, where):
    with pytest.raises(ControlError, match=f"{where}: layer key must be an int or 'all'.*got {re.escape(repr(key))}"):
        build(key)


@pytest.mark.parametrize("key", ['"1.9"', '"1.0"', '"one"', '""'])
def test_non_integral_json_layer_keys_are_refused(key):
    with pytest.raises(ControlError, match="routing: layer key must be an int or 'all'"):
        Controls.from_json(f'{{"routing": {{{key}: {{"top_k": 2}}}}}}')


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Controls(routing=[RoutingControl()]), r"routing must be a mapping of layer \(or 'all'\) -> routing control"),
    (lambda: Controls(latent=8), "latent must be a mapping"),
    (lambda: Controls(routing={1: {"top_k": 2}}), r"routing\[1\] must be a RoutingControl, got dict"),
    (lambda: Controls(latent={0: 8}), r"latent\[0\] must be a LatentControl, got int"),
    (lambda: Controls(routing_replay={"source": "run.zarr"}), "routing_replay must be a RoutingReplay, got dict"),
    (lambda: Controls.top_k(2, layers=1.9), "layers must be a layer, 'all' or a list of layers, got 1.9"),
    (lambda: Controls.bias([0.5]), r"Controls.bias must be a mapping \{layer: \{expert: offset\}\}, got list"),
])
def test_wrong_python_types_are_named(build, message):
    with pytest.raises(ControlError, match=message):
        build()


def test_a_model_without_moe_layers_refuses_routing_for_all():
    dense = TINY.replace(first_k_dense_replace=TINY.num_hidden_layers)
    with pytest.raises(ControlError, match=r"routing\['all'\]: this model has no MoE layers"):
        Controls.top_k(2).validate(dense)
    Controls(latent={"all": LatentControl(8)}).validate(dense)  # the latent still exists in every layer


def test_no_controls_and_neutral_controls_are_the_default_path(model, ids):
    ref = model(ids)
    assert torch.equal(model(ids, controls={}), ref)
    assert torch.equal(model(ids, controls=Controls().resolve(TINY)), ref)
    neutral = Controls(routing={"all": RoutingControl(top_k=4, temperature=1.0, shared_experts=True)},
                       latent={"all": LatentControl(32, "raw")})
    assert torch.equal(model(ids, controls=neutral.resolve(TINY)), ref)
