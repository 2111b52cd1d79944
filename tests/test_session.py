"""Session: incremental re-runs equal full re-runs, interventions are obeyed, bad requests change nothing, and
concurrent requests end in the state of the last one."""

from __future__ import annotations

import threading

import pytest
import torch

from workbench.controls import ControlError, Controls, LatentControl, RoutingControl
from workbench.loader import load_model
from workbench.session import Session

PROMPT = "Mixture of experts, latent attention."


@pytest.fixture(scope="module")
def loaded():
    return load_model("default")  # tiny preset: layer 0 dense, MoE layers 1-2, 16 experts, top-4


@pytest.fixture
def session(loaded):
    return Session(loaded.model, PROMPT, loaded.tokenizer, continuation=4)


def assert_same_run(a, b):
    assert torch.equal(a.logits, b.logits)
    assert a.continuation_after == b.continuation_after
    assert a.expert_change == b.expert_change
    assert torch.equal(a.loss_delta, b.loss_delta)


def test_baseline_result(session):
    r = session.result
    assert r.generation == 0 and r.kl == 0.0 and r.top_before == r.top_after
    assert set(r.expert_change) == {1, 2} and all(v == 0.0 for v in r.expert_change.values())
    assert len(r.continuation_before) == 4 and r.continuation_before == r.continuation_after
    assert r.loss_delta.shape == (len(PROMPT),) and not r.loss_delta.any()  # BOS + bytes: S - 1 = len(PROMPT)


def test_ablated_expert_is_never_chosen(session, loaded):
    seen: list[torch.Tensor] = []
    with loaded.model.probes.listen(["blocks.*.mlp.hook_expert_indices"], lambda _, v: seen.append(v)):
        r = session.apply(Controls(routing={"all": RoutingControl(ablate=(0, 7))}))
    assert r is not None and r.kl > 0 and max(r.expert_change.values()) > 0
    assert len(seen) > 2  # the prompt's layers and every decode step of the continuation
    assert not any(torch.isin(ids, torch.tensor([0, 7])).any() for ids in seen)
    assert all(not torch.isin(ids, torch.tensor([0, 7])).any() for ids in session.expert_ids.values())


def test_forced_routing_is_obeyed(session):
    r = session.apply({"routing": {"2": {"force": [9, 4], "top_k": 3}}})
    assert r is not None and r.start_layer == 2
    ids = session.expert_ids[2]  # [S, 3]
    assert ids.shape[1] == 3 and (ids[:, 0] == 9).all() and (ids[:, 1] == 4).all()
    assert r.expert_change[1] == 0.0 and r.expert_change[2] > 0


@pytest.mark.parametrize("controls", [
    Controls(routing={2: RoutingControl(bias_offset={3: 0.5}, temperature=2.0)}),
    Controls(routing={"all": RoutingControl(top_k=2, shared_experts=False)}),
    Controls(latent={0: LatentControl(6)}),
    Controls(latent={"all": LatentControl(10, "raw")}, routing={1: RoutingControl(norm_topk_prob=False)}),
])
def test_incremental_rerun_equals_full_rerun(session, controls):
    r = session.apply(controls)
    assert r is not None
    assert_same_run(r, session.full_run(controls))


def test_rerun_starts_at_the_first_changed_layer(session):
    first = Controls(latent={0: LatentControl(8)})
    assert session.apply(first).start_layer == 0  # type: ignore[union-attr]
    second = Controls(latent={0: LatentControl(8)}, routing={2: RoutingControl(ablate=(1,))})
    r = session.apply(second)
    assert r is not None and r.start_layer == 2  # layers 0-1 reused from the current (truncated) state
    assert_same_run(r, session.full_run(second))
    again = session.apply(second)
    assert again is not None and again.start_layer == 3 and torch.equal(again.logits, r.logits)
    back = session.reset()
    assert back is not None and back.start_layer == 0 and back.kl == 0.0
    assert torch.equal(back.logits, session.baseline.logits)


@pytest.mark.parametrize(("request_", "message"), [
    (Controls(routing={5: RoutingControl(top_k=1)}), "unknown layer"),
    (Controls(routing={1: RoutingControl(top_k=0)}), "top_k=0"),
    (Controls(routing={1: RoutingControl(top_k=13, ablate=(0, 1, 2, 3))}), r"top_k=13 must be in 1..12"),
    (Controls(latent={1: LatentControl(64)}), "rank=64 must be in 1..kv_lora_rank=32"),
    ('{"routing": {"all": {"top_k": "many"}}}', "top_k must be int, got 'many'"),
])
def test_impossible_settings_leave_the_session_as_it_was(session, request_, message):
    session.apply(Controls(routing={2: RoutingControl(top_k=2)}))
    before_state, before_generation = session._state, session.generation
    with pytest.raises(ControlError, match=message):
        session.apply(request_)
    assert session._state is before_state and session.generation == before_generation
    assert session.controls == Controls(routing={2: RoutingControl(top_k=2)})


def test_the_latest_request_wins(session, loaded):
    """A is running (held at its first layer); B and C queue behind it; B gives way, C is what the session shows."""
    entered, release = threading.Event(), threading.Event()

    def hold_first_run(_name, _value):
        if not entered.is_set():
            entered.set()
            release.wait(10)

    requests = {name: Controls(latent={0: LatentControl(rank)}) for name, rank in (("A", 4), ("B", 8), ("C", 12))}
    results: dict[str, object] = {}

    def submit(name):
        results[name] = session.apply(requests[name])

    with loaded.model.probes.listen(["blocks.0.attn.hook_kv_latent"], hold_first_run):
        threads = {name: threading.Thread(target=submit, args=(name,)) for name in requests}
        threads["A"].start()
        assert entered.wait(10)
        for number, name in ((2, "B"), (3, "C")):
            threads[name].start()
            while session.generation < number:
                threading.Event().wait(0.001)
        release.set()
        for t in threads.values():
            t.join(10)
    assert results["B"] is None and results["A"] is not None and results["C"] is not None
    assert session.controls == requests["C"] and session.result.generation == 3
    assert_same_run(session.result, session.full_run(requests["C"]))


def test_rapid_updates_from_threads_end_consistent(session):
    requests = [Controls(routing={2: RoutingControl(bias_offset={e: 0.3})}) for e in range(8)]
    threads = [threading.Thread(target=session.apply, args=(c,)) for c in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert session.result.generation == session.generation == len(requests)
    assert session.controls in requests
    assert_same_run(session.result, session.full_run(session.controls))
