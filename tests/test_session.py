"""Session: incremental re-runs equal full re-runs, interventions are obeyed, bad requests change nothing, and
concurrent requests end in the state of the last one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from workbench.controls import ControlError, Controls, LatentControl, RoutingControl
from workbench.loader import load_model
from workbench.session import Session

PROMPT = "Mixture of experts, latent attention."


@pytest.fixture(scope="module")
def loaded():
    return load_model("default-v3")  # V3-style: layer 0 dense, MoE layers 1-3, 16 experts in 4 groups, top-4


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
    assert set(r.expert_change) == set(session.config.moe_layers) and all(v == 0.0 for v in r.expert_change.values())
    assert len(r.continuation_before) == 4 and r.continuation_before == r.continuation_after
    assert r.loss_delta.shape == (session.input_ids.shape[1] - 1,) and not r.loss_delta.any()


def test_a_report_first_apply_then_its_continuation_equals_a_whole_apply(loaded):
    controls = Controls(routing={"all": RoutingControl(top_k=1)})
    whole = Session(loaded.model, PROMPT, loaded.tokenizer, continuation=4)
    split = Session(loaded.model, PROMPT, loaded.tokenizer, continuation=4)
    want = whole.apply(controls)
    report = split.apply(controls, continuation=False)
    assert report.continuation_pending and report.continuation_after == () and report.continuation_text_after == ""
    assert torch.equal(report.logits, want.logits) and report.kl == want.kl and report.expert_change == want.expert_change
    assert report.continuation_before == want.continuation_before  # the baseline's is always there
    done = split.finish_continuation(report.generation)
    assert not done.continuation_pending and done.continuation_after == want.continuation_after
    assert done.continuation_text_after == want.continuation_text_after and split.result == done
    assert split.finish_continuation(report.generation) == done  # finished already: the same result
    other = Controls(routing={"all": RoutingControl(top_k=2)})
    stale = split.apply(other, continuation=False)
    assert split.finish_continuation(report.generation) is None  # superseded by `stale`'s generation
    # an apply after an undecoded one decodes its own continuation, as a fresh whole apply does
    again = split.apply(Controls(routing={"all": RoutingControl(top_k=2)}, latent={}))
    assert stale.continuation_pending and not again.continuation_pending
    assert again.continuation_after == whole.apply(other).continuation_after


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
    assert again is not None and again.start_layer == session.config.num_hidden_layers  # nothing to re-run
    assert torch.equal(again.logits, r.logits)
    back = session.reset()
    assert back is not None and back.start_layer == 0 and back.kl == 0.0
    assert torch.equal(back.logits, session.baseline.logits)


@pytest.mark.parametrize(("request_", "message"), [
    (Controls(routing={5: RoutingControl(top_k=1)}), "unknown layer"),
    (Controls(routing={1: RoutingControl(top_k=0)}), "top_k=0"),
    (Controls(routing={1: RoutingControl(top_k=13, ablate=(0, 1, 2, 3))}), r"top_k=13 must be in 1..12"),
    (Controls(latent={1: LatentControl(1000)}), r"rank=1000 must be in 1..kv_lora_rank=\d+"),
    ('{"routing": {"all": {"top_k": "many"}}}', "top_k must be int, got 'many'"),
])
def test_impossible_settings_leave_the_session_as_it_was(session, request_, message):
    session.apply(Controls(routing={2: RoutingControl(top_k=2)}))
    before_state, before_generation = session._state, session.generation
    with pytest.raises(ControlError, match=message):
        session.apply(request_)
    assert session._state is before_state and session.generation == before_generation
    assert session.controls == Controls(routing={2: RoutingControl(top_k=2)})


# ---------------------------------------------------------------------- the session's own arguments
@pytest.mark.parametrize(("prompt", "kwargs", "message"), [
    # token ids are never rounded: a float prompt was truncated to ints before
    (torch.tensor([5.0, 6.0, 7.5]), {}, r"prompt token ids must be integers, got torch.float32 values"),
    (torch.tensor([[5.0, 6.0, 7.0]], dtype=torch.float64), {}, "prompt token ids must be integers, got torch.float64"),
    ([5.5, 6.0, 7.0], {}, "prompt token ids must be integers"),
    (torch.tensor([True, False, True]), {}, "prompt token ids must be integers, got torch.bool"),
    # one sequence: a batch would be run, then compared on its first row only
    (torch.ones(2, 5, dtype=torch.long), {}, r"a session takes one sequence: the prompt must have shape \[S\] or "
                                             r"\[1, S\], got shape \[2, 5\]"),
    ([[5, 6, 7], [8, 9, 10]], {}, r"got shape \[2, 3\]"),
    (torch.ones(1, 1, 5, dtype=torch.long), {}, r"got shape \[1, 1, 5\]"),
    (torch.tensor(5), {}, r"got shape \[\]"),
    ([5], {}, "the prompt needs at least 2 tokens"),
    ([], {}, "the prompt needs at least 2 tokens"),
    ([5, 5000], {}, r"token id 5000 at position \[0, 1\] is outside the vocabulary \[0, 2048\)"),
    ([5] * 1020, {"continuation": 8}, "input reaches position 1028, beyond max_position_embeddings=1024"),
    ("text", {"tokenizer": None}, "a text prompt needs a tokenizer"),
    ([5, 6, 7], {"top": -1}, "top must be an int >= 1, got -1"),  # was torch's raw topk error
    ([5, 6, 7], {"top": 0}, "top must be an int >= 1, got 0"),
    ([5, 6, 7], {"top": 2.5}, "top must be an int >= 1, got 2.5"),
    ([5, 6, 7], {"top": True}, "top must be an int >= 1, got True"),
    ([5, 6, 7], {"continuation": -1}, "continuation must be an int >= 0, got -1"),
    ([5, 6, 7], {"continuation": 1.5}, "continuation must be an int >= 0, got 1.5"),
    ([5, 6, 7], {"calibration": torch.tensor([1.0, 2.0])}, "calibration token ids must be integers"),
    ([5, 6, 7], {"calibration": torch.ones(2, 4, dtype=torch.long)}, r"the calibration must have shape \[S\] or \[1, S\]"),
    ([5, 6, 7], {"calibration": "text", "tokenizer": None}, "a text calibration needs a tokenizer"),
])
def test_bad_session_arguments_are_named(loaded, prompt, kwargs, message):
    kwargs = {"tokenizer": loaded.tokenizer, "continuation": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        Session(loaded.model, prompt, **kwargs)


@pytest.mark.parametrize("prompt", [
    [5, 6, 7], (5, 6, 7), torch.tensor([5, 6, 7]), torch.tensor([[5, 6, 7]]), torch.tensor([5, 6, 7], dtype=torch.int32),
    torch.tensor([5, 6, 7], dtype=torch.uint8), np.array([5, 6, 7]),
])
def test_one_sequence_of_integer_ids_in_any_form_is_the_same_prompt(loaded, prompt):
    s = Session(loaded.model, prompt, continuation=0, top=2)
    assert s.input_ids.dtype == torch.long and s.input_ids.tolist() == [[5, 6, 7]]
    assert len(s.result.top_after) == 2


def test_top_above_the_vocabulary_reports_all_of_it(loaded):
    s = Session(loaded.model, [5, 6, 7], continuation=0, top=10**6)
    assert len(s.result.top_after) == loaded.model.config.vocab_size


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


# ---------------------------------------------------------------------- FP8 per run
def _fp8_copy(loaded, **enable):
    import copy

    from workbench.model.fp8 import enable_fp8

    model = copy.deepcopy(loaded.model)
    for kwargs in enable.get("calls", []):
        enable_fp8(model, **kwargs)
    return model


@pytest.mark.parametrize(("fp8", "calls"), [
    ({1: ["experts"]}, [{"layers": [1], "sites": ["experts"]}]),
    ({2: "all", 0: ["attn", "mlp"]}, [{"layers": [2]}, {"layers": [0], "sites": ["attn", "mlp"]}]),
    ({"all": ["o_proj", "shared_experts"]}, [{"sites": ["o_proj", "shared_experts"]}]),
])
def test_fp8_controls_equal_enable_fp8_on_a_copy_and_leave_the_shared_model_alone(session, loaded, fp8, calls):
    from workbench.model.fp8 import fp8_sites
    from workbench.model.fp8_linear import FP8Linear

    before = loaded.model(session.input_ids)
    r = session.apply(Controls(fp8=fp8))
    assert r.start_layer == min(k for k in fp8 if k != "all") if "all" not in fp8 else r.start_layer == 0
    want = Session(_fp8_copy(loaded, calls=calls), PROMPT, loaded.tokenizer, continuation=4).result
    assert torch.equal(r.logits, want.logits) and r.continuation_after == want.continuation_after
    assert r.kl > 0  # FP8 changes the numbers
    assert list(fp8_sites(loaded.model)) == [] and not any(isinstance(m, FP8Linear) for m in loaded.model.modules())
    assert torch.equal(loaded.model(session.input_ids), before)  # other users see the untouched model
    assert_same_run(r, session.full_run(Controls(fp8=fp8)))  # incremental == full re-run
    assert session.reset().kl == 0.0


def test_fp8_controls_switch_off_sites_of_a_model_in_fp8(loaded):
    """On a model with FP8 on everywhere, a control keeping only layer 2's experts in FP8 equals a model with
    FP8 only there: sites a control leaves out run in high precision."""
    everywhere = _fp8_copy(loaded, calls=[{}])
    s = Session(everywhere, PROMPT, loaded.tokenizer, continuation=2)
    r = s.apply(Controls(fp8={"all": [], 2: ["experts"]}))
    want = Session(_fp8_copy(loaded, calls=[{"layers": [2], "sites": ["experts"]}]), PROMPT, loaded.tokenizer,
                   continuation=2).result
    assert torch.equal(r.logits, want.logits)


def test_fp8_control_runs_are_private_to_their_thread(session, loaded):
    """While a thread runs under FP8 controls, a plain forward in another thread sees high precision."""
    from workbench.model.dispatch import FP8_RUN_SITES as RUN_SITES

    plain = loaded.model(session.input_ids)
    seen = {}

    def other() -> None:
        seen["sites"] = RUN_SITES.get()
        seen["logits"] = loaded.model(session.input_ids)

    from workbench.model.dispatch import run_fp8_sites

    with run_fp8_sites(frozenset({"experts", "o_proj"})):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["sites"] is None and torch.equal(seen["logits"], plain)


@pytest.mark.parametrize(("fp8", "message"), [
    ({7: ["experts"]}, r"fp8\[7\]: unknown layer"),
    ({0: ["experts"]}, r"fp8\[0\]: layer 0 has no \['experts'\]"),
    ({1: ["mlp"]}, r"fp8\[1\]: layer 1 has no \['mlp'\]"),
    ({1: ["q_proj"]}, r"has no \['q_proj'\]"),
    ({1: ["ffn"]}, r"fp8\[1\]: unknown site 'ffn'"),
    ({1: 3}, r"fp8\[1\] must be 'all' or a list of site names"),
])
def test_bad_fp8_controls_are_named_and_change_nothing(session, fp8, message):
    state = session._state
    with pytest.raises(ControlError, match=message):
        session.apply(Controls(fp8=fp8))
    assert session._state is state


def test_fp8_kv_b_proj_cannot_be_switched_per_run_in_absorb_mode(loaded):
    s = Session(loaded.model, PROMPT, loaded.tokenizer, continuation=0, mode="absorb")
    with pytest.raises(ControlError, match="kv_b_proj cannot be switched per run in absorb mode"):
        s.apply(Controls(fp8={1: ["kv_b_proj"]}))
    assert s.apply(Controls(fp8={1: ["experts", "o_proj"]})).kl > 0


# ---------------------------------------------------------------------- routing replay
def _record(loaded, prompt_ids, controls, path=None):
    """Trace `prompt_ids` under `controls` (the model's own routing bent by them) into a store at `path`."""
    from workbench.trace import Trace, TraceStore

    resolved = controls.resolve(loaded.model.config)
    t = Trace(loaded.model, ["expert_ids", "expert_weights"], tokenizer=loaded.tokenizer, checkpoint=loaded.digest)
    real = loaded.model.forward

    def with_controls(ids, cache=None, mode="naive", controls=None):
        return real(ids, cache=cache, mode=mode, controls=resolved)

    loaded.model.forward = with_controls  # the recorder's module hooks still fire around it
    try:
        with t:
            batch = t.forward(prompt_ids)
    finally:
        del loaded.model.forward
    logits = real(prompt_ids, controls=resolved)[0]
    if path is not None:
        store = TraceStore.create(path, t.attrs(), t.layout, chunk_tokens=16, vocab=t.vocab())
        store.append(batch, windows=1)
        store.close()
    return t.to_xarray(), logits


def test_replaying_a_recorded_routing_reproduces_the_recorded_forward_exactly(tmp_path, session, loaded):
    bent = Controls(routing={"all": RoutingControl(bias_offset={3: 0.5, 7: -0.2}, ablate=(0, 5)),
                             2: RoutingControl(force=(9,), routed_scaling_factor=1.7)})
    ds, recorded = _record(loaded, session.input_ids, bent, tmp_path / "t.zarr")
    assert not torch.equal(recorded, session.result.logits)  # the controls did change the run
    for source in (tmp_path / "t.zarr", ds):  # a store on disk, or an in-memory trace
        r = session.apply(Controls.replay(source, seq=0))
        assert torch.equal(r.logits, recorded)
        for layer in (1, 2):
            want = torch.from_numpy(ds.expert_ids.sel(layer=layer).values.astype("int64"))
            assert torch.equal(session.expert_ids[layer], want)
        assert_same_run(r, session.full_run(Controls.replay(source, seq=0)))
    # JSON keeps the store path and reloads it
    c = Controls.from_json(Controls.replay(tmp_path / "t.zarr").to_json())
    assert torch.equal(session.apply(c).logits, recorded)
    # replaying one layer only: layer 1 forced, layer 2 routed by the gate again
    part = session.apply(Controls.replay(tmp_path / "t.zarr", layers=[1]))
    assert torch.equal(session.expert_ids[1], torch.from_numpy(ds.expert_ids.sel(layer=1).values.astype("int64")))
    assert part.start_layer == 1 and not torch.equal(part.logits, recorded)


def test_replay_refuses_another_prompt_model_or_trace(tmp_path, session, loaded):
    from workbench.model.transformer import DeepSeekModel

    path = tmp_path / "t.zarr"
    _record(loaded, session.input_ids, Controls(), path)
    state = session._state
    other = Session(loaded.model, "another prompt entirely", loaded.tokenizer, continuation=0)
    with pytest.raises(ControlError, match=r"it recorded \d+ tokens .* this session's prompt is"):
        other.apply(Controls.replay(path))
    cfg = loaded.model.config.replace(n_routed_experts=8, n_group=2, topk_group=1)
    with pytest.raises(ControlError, match="recorded with another model"):
        Session(DeepSeekModel.random(cfg), session.input_ids[0], continuation=0).apply(Controls.replay(path))
    with pytest.raises(ControlError, match="has no tokens of seq 5"):
        Controls.replay(path, seq=5)
    with pytest.raises(ControlError, match=r"layers \[0\] are not MoE layers"):
        Controls.replay(path, layers=[0])
    with pytest.raises(ControlError, match=r"routing fields \['ablate'\] cannot apply"):
        session.apply(Controls.replay(path, routing={1: RoutingControl(ablate=(2,))}))
    ds, _ = _record(loaded, session.input_ids, Controls())
    with pytest.raises(ControlError, match="in-memory trace, so JSON cannot bring it back"):
        Controls.from_json(Controls.replay(ds).to_json())
    with pytest.raises(ControlError, match=r"an in-memory trace holds no \['expert_weights'\]; record it with sites"):
        Controls.replay(ds.drop_vars("expert_weights"))
    lost = ds.copy(deep=True)
    lost["expert_ids"].loc[{"layer": 2}] = -1  # what a trace that did not capture layer 2 holds
    with pytest.raises(ControlError, match=r"did not capture the routing of layers \[2\] for seq 0"):
        Controls.replay(lost)
    assert Controls.replay(lost, layers=[1]).replayed(1)  # the captured layer alone still replays
    wild = ds.copy(deep=True)
    wild["expert_ids"].loc[{"layer": 1}] = 99
    with pytest.raises(ControlError, match="layer 1 names experts outside 0..15"):
        session.apply(Controls.replay(wild))
    assert session._state is state


def test_replay_refuses_a_trace_of_another_checkpoint_with_the_same_config(tmp_path, session, loaded):
    """A fine-tune has this model's config but routes differently: its recorded routing is not this model's."""
    import copy

    path = tmp_path / "t.zarr"
    _record(loaded, session.input_ids, Controls(), path)
    assert loaded.model.checkpoint_digest == loaded.digest  # the loader names the weights on the model too
    tuned = copy.deepcopy(loaded.model)
    with torch.no_grad():
        tuned.embed_tokens.weight.mul_(1.01)
    tuned.checkpoint_digest = "sha256:0123456789abcdef"
    with pytest.raises(ControlError, match=r"recorded with another checkpoint \(digest sha256:\w+, this model is "
                                           r"sha256:0123456789abcdef\)"):
        Session(tuned, session.input_ids[0], continuation=0).apply(Controls.replay(path))
    with pytest.raises(ControlError, match="another checkpoint"):
        tuned(session.input_ids, controls=Controls.replay(path))  # a bare forward checks it too
    tuned.checkpoint_digest = None  # a model of unknown origin: only the config can be checked
    Session(tuned, session.input_ids[0], continuation=0).apply(Controls.replay(path))
    assert session.apply(Controls.replay(path)).kl == 0.0  # the recording model itself replays
