"""Sessions on DeepSeek-V3.2 and V4 models: incremental re-runs equal fresh full forwards under every sparse-attention,
hash-routing, mHC and SwiGLU control; the continuation runs on a cloned V4 cache; the changed-selection fraction
equals a count over the indexer's picks."""

from __future__ import annotations

import pytest
import torch

from workbench.config import PRESETS, ModelConfig
from workbench.controls import AttentionControl, ControlError, Controls, LatentControl, RoutingControl
from workbench.model.transformer import DeepSeekModel
from workbench.session import Session

V4 = ModelConfig.from_name("tiny-v4")  # layers: 0 window only (hash-routed), 1 CSA, 2 HCA, 3 CSA
S = 80  # > the window (32); 20 CSA entries > index_topk (16)


@pytest.fixture(scope="module")
def v4():
    return DeepSeekModel.random(V4, seed=7)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V4.vocab_size, (S,), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def session(v4, ids):
    return Session(v4, ids, continuation=4)


CONTROLS = [  # (controls, first layer they touch)
    (Controls.index_topk(2), 1),
    (Controls.dense_attention(layers=[3]), 3),
    (Controls.sliding_window(6), 0),
    (Controls(attention={2: AttentionControl(window=False), 3: AttentionControl(compressed=False)}), 2),
    (Controls(mhc_identity={1: True}), 1),
    (Controls(swiglu_limit={"all": 0.01}), 0),
    (Controls(routing={2: RoutingControl(top_k=2, ablate=(3,))}), 2),
]


def test_baseline(session, v4, ids):
    r = session.result
    assert r.kl == 0.0 and set(r.selection_change) == {1, 3} and set(r.expert_change) == {0, 1, 2, 3}
    assert all(v == 0.0 for v in (*r.selection_change.values(), *r.expert_change.values()))
    assert torch.equal(r.logits, v4(ids[None])[0])
    assert r.continuation_before == tuple(v4.generate(ids[None], 4, mode="naive")[0, S:].tolist())
    assert session.baseline.residuals[0].shape == (1, S, V4.hc_mult, V4.hidden_size)  # the streams


@pytest.mark.parametrize(("controls", "start"), CONTROLS, ids=[c.to_json() for c, _ in CONTROLS])
def test_rerun_equals_a_fresh_full_forward(session, v4, ids, controls, start):
    session.reset()
    r = session.apply(controls)
    assert r is not None and r.start_layer == start
    torch.testing.assert_close(r.logits, v4(ids[None], controls=controls)[0], rtol=0, atol=1e-6)
    full = session.full_run(controls)
    assert torch.equal(r.logits, full.logits) and r.continuation_after == full.continuation_after
    assert r.selection_change == full.selection_change and r.expert_change == full.expert_change
    assert r.continuation_after == tuple(v4.generate(ids[None], 4, mode="naive", controls=controls)[0, S:].tolist())
    assert r.kl > 0 and r.loss_delta.abs().max() > 0


def test_chained_changes_and_reset(session, v4, ids):
    session.reset()
    steps = [Controls.index_topk(3), Controls.index_topk(3) | Controls(tid2eid={0: {int(ids[5]): [0, 1, 2, 3]}}),
             Controls(mhc_identity={"all": True}), Controls.index_topk(3, layers=[3])]
    for controls in steps:
        r = session.apply(controls)
        assert r is not None
        full = session.full_run(controls)
        torch.testing.assert_close(r.logits, full.logits, rtol=0, atol=1e-6)
        assert r.continuation_after == full.continuation_after and r.selection_change == full.selection_change
    back = session.reset()
    assert back is not None and torch.equal(back.logits, session.baseline.logits) and back.kl == 0.0
    assert back.continuation_after == back.continuation_before  # the prompt's cache survived every decode


def test_tid2eid_edit_changes_the_experts_of_that_token(session, ids):
    session.reset()
    token = int(ids[5])
    r = session.apply({"tid2eid": {"0": {str(token): [12, 13, 14, 15]}}})
    assert r is not None and r.start_layer == 0
    rows = (ids == token).nonzero()[:, 0]
    assert (session.expert_ids[0][rows] == torch.tensor([12, 13, 14, 15])).all()
    base = session.baseline.expert_ids[0]
    expected = (1 - (torch.isin(base[rows], torch.tensor([12, 13, 14, 15])).sum(-1) / 4)).sum() / S
    assert r.expert_change[0] == pytest.approx(float(expected))


def test_selection_change_counts_the_indexer_picks(session, v4, ids):
    def picks(controls: Controls) -> dict[int, list[set[int]]]:
        out: dict[int, list[set[int]]] = {}
        with v4.probes.listen(["blocks.*.attn.hook_index_selected"],
                              lambda n, v: out.__setitem__(int(n.split(".")[1]), [set(r) - {-1} for r in v[0].tolist()])):
            v4(ids[None], controls=controls)
        return out

    session.reset()
    r = session.apply(Controls.index_topk(5))
    assert r is not None
    before, after = picks(Controls()), picks(Controls.index_topk(5))
    for layer in (1, 3):
        fractions = [1 - len(a & b) / max(len(a), len(b)) for a, b in zip(before[layer], after[layer], strict=True)
                     if a or b]
        assert r.selection_change[layer] == pytest.approx(sum(fractions) / len(fractions))
        assert r.selection_change[layer] > 0
    dense = session.apply(Controls.dense_attention())
    assert dense is not None
    # dense reads every visible entry: a query t that sees v = (t+1)//4 > 16 entries keeps its 16 of them
    visible = [(t + 1) // 4 for t in range(S)]
    expected = [1 - min(v, 16) / v for v in visible if v]
    assert dense.selection_change[1] == pytest.approx(sum(expected) / len(expected))
    off = session.apply(Controls(attention={"all": AttentionControl(compressed=False)}))
    assert off is not None and off.selection_change == {1: 1.0, 3: 1.0}


def test_bad_controls_change_nothing(session):
    session.reset()
    session.apply(Controls.index_topk(4))
    state = session._state
    for bad in (Controls.sliding_window(64), Controls(latent={1: LatentControl(2)}),
                {"tid2eid": {"1": {"3": [0, 1, 2, 3]}}}, {"attention": {"0": {"index_topk": 4}}}):
        with pytest.raises(ControlError):
            session.apply(bad)
        assert session._state is state


def test_fast_path_session(v4, ids):
    s = Session(v4, ids[:48], continuation=3, mode="absorb")
    for controls in (Controls.index_topk(2), Controls.sliding_window(5) | Controls(mhc_identity={0: True})):
        r = s.apply(controls)
        assert r is not None
        torch.testing.assert_close(r.logits, v4(ids[None, :48], mode="absorb", controls=controls)[0], rtol=0, atol=1e-6)
        assert r.continuation_after == tuple(v4.generate(ids[None, :48], 3, controls=controls)[0, 48:].tolist())


def test_v32_session():
    cfg = PRESETS["tiny"].replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=6)
    model = DeepSeekModel.random(cfg, seed=1)
    prompt = torch.randint(2, 258, (20,), generator=torch.Generator().manual_seed(1))
    s = Session(model, prompt, continuation=4)
    assert set(s.result.selection_change) == {0, 1, 2}
    assert s.result.continuation_before == tuple(model.generate(prompt[None], 4, mode="naive")[0, 20:].tolist())
    for controls, start in ((Controls.index_topk(3, layers=[1, 2]), 1), (Controls.dense_attention(), 0),
                            (Controls.index_topk(2, layers=[2]), 0)):
        r = s.apply(controls)
        assert r is not None and r.start_layer == start
        torch.testing.assert_close(r.logits, model(prompt[None], controls=controls)[0], rtol=0, atol=1e-6)
        full = s.full_run(controls)
        assert r.continuation_after == full.continuation_after and r.selection_change == full.selection_change
        assert r.continuation_after == tuple(model.generate(prompt[None], 4, mode="naive",
                                                            controls=controls)[0, 20:].tolist())
    dense = s.apply(Controls.dense_attention())
    assert dense is not None
    # every causal key: query t reads t+1 keys where its indexer kept min(6, t+1)
    expected = [1 - min(6, t + 1) / (t + 1) for t in range(20)]
    assert dense.selection_change[0] == pytest.approx(sum(expected) / len(expected))
