"""V3.2 / V4 controls (index_topk, dense attention, V4 window and branches, tid2eid rows, identity mHC, SwiGLU limit):
each equals a plain computation (a model built with that setting, an edited buffer, a hand-written block), is
refused with a message naming the bad setting, and survives a JSON round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.config import PRESETS, ModelConfig
from workbench.controls import AttentionControl, ControlError, Controls, LatentControl, RoutingControl
from workbench.model.block import LayerControls
from workbench.model.transformer import DeepSeekModel
from workbench.model.v4.hyper import collapse

V4 = ModelConfig.from_name("tiny-v4")  # layers: 0 window only (hash-routed), 1 CSA, 2 HCA (rate 16), 3 CSA
V32 = PRESETS["tiny"].replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=6)
S = 96  # > the window (32); 24 CSA entries > index_topk (16); 6 HCA entries


@pytest.fixture(scope="module")
def v4():
    return DeepSeekModel.random(V4, seed=5)


@pytest.fixture(scope="module")
def v4_ids():
    return torch.randint(0, V4.vocab_size, (1, S), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def v32():
    return DeepSeekModel.random(V32, seed=4)


@pytest.fixture(scope="module")
def v32_ids():
    return torch.randint(2, 258, (1, 20), generator=torch.Generator().manual_seed(3))


def rebuilt(model: DeepSeekModel, **config) -> DeepSeekModel:
    """The same weights in a model whose config has `config` changed."""
    other = DeepSeekModel(model.config.replace(**config)).eval()
    other.load_state_dict(model.state_dict())
    return other


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- V3.2
def test_v32_index_topk_equals_a_model_with_that_budget(v32, v32_ids):
    for k in (2, 5):
        same(v32(v32_ids, controls=Controls.index_topk(k)), rebuilt(v32, index_topk=k)(v32_ids))
    assert not torch.allclose(v32(v32_ids, controls=Controls.index_topk(2)), v32(v32_ids))  # sparsity is live


def test_v32_dense_attention_is_deepseek_v3(v32, v32_ids):
    v3 = DeepSeekModel(V32.replace(model_type="deepseek_v3")).eval()
    v3.load_state_dict({k: v for k, v in v32.state_dict().items() if ".indexer." not in k})
    dense = v32(v32_ids, controls=Controls.dense_attention())
    same(dense, v3(v32_ids))
    same(dense, v32(v32_ids, controls=Controls.index_topk(v32_ids.shape[1])))  # a budget holding every key
    for mode in ("naive", "absorb"):
        same(v32(v32_ids, mode=mode, controls=Controls.dense_attention(layers=[1])),
             v32(v32_ids, mode=mode, controls={1: LayerControls(index_topk=10**6)}))


def test_v32_refuses_what_it_has_not(v32):
    cfg = v32.config
    with pytest.raises(ControlError, match=r"index_topk=0 must be in 1\.\."):
        Controls.index_topk(0).validate(cfg)
    with pytest.raises(ControlError, match=r"attention\[1\].*no sliding window.*\['sliding_window'\]"):
        Controls(attention={1: AttentionControl(sliding_window=4)}).validate(cfg)
    with pytest.raises(ControlError, match="index_topk and dense=True both set"):
        Controls(attention={0: AttentionControl(index_topk=3, dense=True)}).validate(cfg)
    with pytest.raises(ControlError, match="mhc_identity: a deepseek_v4 control"):
        Controls(mhc_identity={0: True}).validate(cfg)
    with pytest.raises(ControlError, match="swiglu_limit: a deepseek_v4 control"):
        Controls(swiglu_limit={"all": 3.0}).validate(cfg)
    with pytest.raises(ControlError, match=r"tid2eid\['all'\]: this deepseek_v32 model has no hash-routed layers"):
        Controls(tid2eid={"all": {3: [0, 1, 2, 3]}}).validate(cfg)
    with pytest.raises(ControlError, match=r"attention\['all'\]: no layer of this deepseek_v3 model"):
        Controls.index_topk(3).validate(cfg.replace(model_type="deepseek_v3"))


# ---------------------------------------------------------------------- V4 attention
def test_v4_index_topk_and_dense_equal_models_with_that_budget(v4, v4_ids):
    for k in (1, 5):
        same(v4(v4_ids, controls=Controls.index_topk(k)), rebuilt(v4, index_topk=k)(v4_ids))
    every = rebuilt(v4, index_topk=S // 4)(v4_ids)  # a budget holding every entry = dense
    same(v4(v4_ids, controls=Controls.dense_attention()), every)
    assert not torch.allclose(every, v4(v4_ids))  # the config's 16 of 24 entries: the indexer's choice matters
    for mode in ("naive", "absorb"):  # the fast (gathered) path too, per layer
        same(v4(v4_ids, mode=mode, controls=Controls.index_topk(3, layers=[3])),
             rebuilt(v4, index_topk=3)(v4_ids, mode=mode, controls=Controls.index_topk(16, layers=[1])))


def test_v4_window_equals_a_model_with_that_window(v4, v4_ids):
    narrow = rebuilt(v4, sliding_window=8)
    for mode in ("naive", "absorb"):
        same(v4(v4_ids, mode=mode, controls=Controls.sliding_window(8)), narrow(v4_ids, mode=mode))
    # token by token on the cache (the ring still holds the config's 31 keys; the control reads 7 of them)
    assert torch.equal(v4.generate(v4_ids[:, :40], 6, controls=Controls.sliding_window(8)),
                       narrow.generate(v4_ids[:, :40], 6))
    assert not torch.equal(v4.generate(v4_ids[:, :40], 6), narrow.generate(v4_ids[:, :40], 6))


def test_v4_dropped_branches_carry_no_attention_mass(v4, v4_ids):
    masses: dict[str, torch.Tensor] = {}
    c = Controls(attention={0: AttentionControl(window=False), 1: AttentionControl(compressed=False),
                            2: AttentionControl(window=False)})
    with v4.probes.listen(["blocks.*.attn.hook_attn_mass"], lambda n, v: masses.__setitem__(n.split(".")[1], v)):
        v4(v4_ids, controls=c)
    assert (masses["0"][..., :2] == 0).all() and torch.allclose(masses["0"][..., 2], torch.ones(()))  # all on sink
    assert (masses["1"][..., 1] == 0).all() and (masses["1"][..., 0] > 0).all()
    assert (masses["2"][..., 0] == 0).all() and (masses["2"][..., 1] > 0).any()
    attn = v4.layers[0].self_attn  # a window-only layer without its window: only the zero-valued sink is left
    x = torch.randn(1, 12, V4.hidden_size)
    assert not attn(x, torch.arange(12), use_window=False).any()


def test_v4_compressed_off_equals_an_indexer_that_selects_nothing(v4, v4_ids):
    def nothing(_name: str, selected: torch.Tensor) -> torch.Tensor:
        return torch.full_like(selected, -1)

    with v4.probes.listen(["blocks.1.attn.hook_index_selected"], nothing):
        empty = v4(v4_ids)
    same(v4(v4_ids, controls=Controls(attention={1: AttentionControl(compressed=False)})), empty)


# ---------------------------------------------------------------------- V4 routing, mHC, SwiGLU
def test_v4_tid2eid_edit_equals_an_edited_buffer(v4, v4_ids):
    tokens = [int(v4_ids[0, 3]), int(v4_ids[0, 10])]
    rows = {tokens[0]: [0, 1, 2, 3], tokens[1]: [15, 7, 9, 4]}
    before = v4.layers[0].mlp.gate.tid2eid.clone()
    edited = copy.deepcopy(v4)
    for token, experts in rows.items():
        edited.layers[0].mlp.gate.tid2eid[token] = torch.tensor(experts)
    got = v4(v4_ids, controls=Controls(tid2eid={0: rows}))
    same(got, edited(v4_ids))
    assert torch.equal(v4.layers[0].mlp.gate.tid2eid, before)  # the shared model is untouched
    same(v4(v4_ids, controls=Controls(tid2eid={"all": rows})), got)  # "all": every hash layer (here layer 0)
    assert not torch.allclose(got, v4(v4_ids))


def test_v4_identity_mhc_equals_a_hand_computation(v4, v4_ids):
    block = v4.layers[2]
    seen: dict[str, torch.Tensor] = {}
    with v4.probes.listen(["blocks.2.hook_resid_pre"], lambda _, v: seen.__setitem__("x", v)):
        v4(v4_ids)
    x, positions = seen["x"], torch.arange(S)
    with torch.no_grad():
        pre, post, _ = block.attn_hc.weights(x)
        y = block.self_attn(block.input_layernorm(collapse(x, pre)), positions, None, "naive")
        x = post.unsqueeze(-1) * y.unsqueeze(-2) + x  # X' = post (x) y + I^T X
        pre, post, _ = block.ffn_hc.weights(x)
        y = block.mlp(block.post_attention_layernorm(collapse(x, pre)), None, v4_ids)
        hand = post.unsqueeze(-1) * y.unsqueeze(-2) + x
        got = block(seen["x"], positions, None, "naive", LayerControls(mhc_identity=True), v4_ids)
    same(got, hand)
    tail = v4.forward_from(2, seen["x"], controls=Controls(mhc_identity={2: True}).resolve(V4), input_ids=v4_ids)
    same(tail, v4(v4_ids, controls=Controls(mhc_identity={2: True})))


def test_v4_swiglu_limit_equals_a_model_with_that_limit(v4, v4_ids):
    for limit in (0.01, 3.0):
        same(v4(v4_ids, controls=Controls(swiglu_limit={"all": limit})), rebuilt(v4, swiglu_limit=limit)(v4_ids))
    tight = v4(v4_ids, controls=Controls(swiglu_limit={1: 0.001}))
    same(tight, v4(v4_ids, controls=Controls(swiglu_limit={"all": 0.001, 0: 10.0, 2: 10.0, 3: 10.0})))
    assert not torch.allclose(tight, v4(v4_ids))  # the clamp fires


# ---------------------------------------------------------------------- validation, resolution, JSON
@pytest.mark.parametrize(("controls", "message"), [
    (Controls(attention={0: AttentionControl(index_topk=4)}),
     r"attention\[0\]: layer 0 is a deepseek_v4 sliding_attention layer, which has no lightning indexer"),
    (Controls(attention={2: AttentionControl(dense=True)}), r"attention\[2\].*heavily_compressed.*\['dense'\]"),
    (Controls(attention={0: AttentionControl(compressed=False)}), r"attention\[0\].*no compressed branch"),
    (Controls.index_topk(0), r"attention for layer 1: index_topk=0 must be in 1\.\.256"),
    (Controls.index_topk(257, layers=[3]), r"index_topk=257 must be in 1\.\.256"),
    (Controls.sliding_window(33), r"sliding_window=33 must be in 1\.\.32"),
    (Controls.sliding_window(0, layers=[2]), r"layer 2: sliding_window=0"),
    (Controls(attention={1: AttentionControl(sliding_window=4, window=False)}), "while window=False"),
    (Controls(attention={3: AttentionControl(compressed=False, index_topk=2)}), "compressed=False drops"),
    (Controls(tid2eid={1: {5: [0, 1, 2, 3]}}), r"tid2eid\[1\]: layer 1 is not hash-routed.*\[0\]"),
    (Controls(tid2eid={0: {512: [0, 1, 2, 3]}}), r"token 512 is outside the vocabulary 0\.\.511"),
    (Controls(tid2eid={0: {5: [0, 1, 2]}}), r"tid2eid\[0\]\[5\]: a row holds num_experts_per_tok=4 experts, got 3"),
    (Controls(tid2eid={0: {5: [0, 1, 2, 16]}}), r"expert\(s\) \[16\] outside 0\.\.15"),
    (Controls(tid2eid={0: {5: [0, 1, 2, 2]}}), "lists an expert twice"),
    (Controls(mhc_identity={4: True}), r"mhc_identity\[4\]: unknown layer; the model has layers 0\.\.3"),
    (Controls(latent={1: LatentControl(4)}), r"latent\[1\]: a latent control projects MLA's c_kv"),
])
def test_v4_refusals_name_the_setting(controls, message):
    with pytest.raises(ControlError, match=message):
        controls.validate(V4)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Controls(swiglu_limit={0: -1.0}), r"swiglu_limit\[0\] must be > 0"),
    (lambda: Controls(swiglu_limit={0: float("nan")}), r"swiglu_limit\[0\] must be > 0"),
    (lambda: Controls(swiglu_limit={0: "3"}), r"swiglu_limit\[0\] must be a number"),
    (lambda: Controls(mhc_identity={"all": 1}), r"mhc_identity\['all'\] must be true or false"),
    (lambda: Controls(tid2eid={0: [1, 2]}), r"tid2eid\[0\] must be an object of token id"),
    (lambda: Controls(tid2eid={0: {"x": [1]}}), "token key must be an int"),
    (lambda: Controls(tid2eid={0: {3: 5}}), r"tid2eid\[0\]\[3\] must be a list of expert ids"),
    (lambda: AttentionControl(index_topk=2.5), "index_topk must be int"),
    (lambda: AttentionControl(dense=1), "dense must be bool"),
    (lambda: Controls.from_dict({"attention": {"1": {"topk": 3}}}), r"attention\[1\]: unknown field\(s\) \['topk'\]"),
    (lambda: Controls.from_dict({"mhc": {}}), r"unknown section\(s\) \['mhc'\]"),
])
def test_malformed_controls_are_refused(build, message):
    with pytest.raises(ControlError, match=message):
        build()


def test_all_entries_apply_where_the_part_exists():
    resolved = (Controls.index_topk(4) | Controls.sliding_window(8, layers=[1])).resolve(V4)
    assert set(resolved) == {1, 3}  # index_topk only reaches the CSA layers
    assert resolved[1].index_topk == 4 and resolved[1].sliding_window == 8 and resolved[3].sliding_window is None
    dense = Controls.dense_attention().resolve(V32)
    assert all(lc.dense_attention and lc.index_topk == V32.max_position_embeddings for lc in dense.values())
    merged = Controls(attention={"all": AttentionControl(index_topk=2)}) | Controls(attention={"all": AttentionControl(
        window=False)})
    assert merged.attention["all"] == AttentionControl(index_topk=2, window=False)


def test_json_round_trip_and_first_difference():
    c = Controls(attention={"all": AttentionControl(index_topk=3), 2: AttentionControl(compressed=False, window=False)},
                 tid2eid={0: {7: [1, 2, 3, 4]}}, mhc_identity={"all": True, 1: False}, swiglu_limit={3: 2.5},
                 routing={1: RoutingControl(temperature=2.0)})
    back = Controls.from_json(c.to_json())
    assert back == c and back.to_dict() == c.to_dict()
    assert set(c.to_dict()) == {"routing", "latent", "attention", "tid2eid", "mhc_identity", "swiglu_limit"}
    assert set(Controls.top_k(2).to_dict()) == {"routing", "latent"}  # V2/V3 controls read as before
    assert c.first_difference(c | Controls(swiglu_limit={3: 2.5}), V4) == V4.num_hidden_layers
    assert c.first_difference(c | Controls(swiglu_limit={3: 2.0}), V4) == 3
    assert c.first_difference(c | Controls(tid2eid={0: {8: [0, 1, 2, 3]}}), V4) == 0
    assert c.first_difference(c | Controls(mhc_identity={1: True}), V4) == 1
    assert Controls.index_topk(3).first_difference(Controls.index_topk(3, layers=[1, 3]), V4) == V4.num_hidden_layers
