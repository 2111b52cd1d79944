"""LiveSession: controls compose and validate before running, a burst of changes runs latest-wins (at once, then
once more with the last value, the stale result unreported), and a new prompt gives every listener a fresh
baseline."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from workbench.controls import ControlError, Controls, LatentControl, RoutingControl
from workbench.loader import LoadedModel, load_model
from workbench.session import ApplyResult
from workbench.widgets.live import LatestWins, LiveSession


def test_update_composes_and_refuses_impossible_controls(live: LiveSession) -> None:
    live.update(routing={"all": RoutingControl(top_k=2)})
    live.update(latent={"all": LatentControl(4)})
    assert live.result.controls == Controls(routing={"all": RoutingControl(top_k=2)}, latent={"all": LatentControl(4)})
    with pytest.raises(ControlError, match=r"routing\[0\]: layer 0 is a dense layer"):
        live.update(routing={0: RoutingControl(top_k=1)})
    assert live.controls() == live.result.controls  # nothing changed
    live.update(routing={"all": None}, latent={"all": None})
    assert live.result.controls == Controls() and live.result.kl == 0.0


def test_a_burst_runs_at_once_then_once_more_with_the_last_value(loaded: LoadedModel) -> None:
    """Latest wins: the first change starts at once; the changes made while it runs become one run with the last of
    them; the stale first result is never reported, so the views never show a control older than the last sent."""
    live = LiveSession(loaded, "a short prompt", continuation=0, background=True)
    seen: list[ApplyResult] = []
    started = threading.Event()
    release = threading.Event()
    real_apply = live.session.apply
    applied: list[Controls] = []

    def slow_apply(controls: Controls, **kwargs: bool) -> ApplyResult | None:
        applied.append(controls)
        started.set()
        release.wait(30)  # hold the first run until the burst is in
        return real_apply(controls, **kwargs)

    live.session.apply = slow_apply  # type: ignore[method-assign]
    live.on_result(seen.append)
    live.update(routing={"all": RoutingControl(top_k=1)})
    assert started.wait(30)  # no debounce: the run began without waiting for quiet
    for k in (2, 3, 2):
        live.update(routing={"all": RoutingControl(top_k=k)})
    release.set()
    live.scheduler.flush()
    assert [c.routing["all"].top_k for c in applied] == [1, 2]  # one run for the whole burst, with its last value
    assert [r.controls for r in seen] == [Controls(routing={"all": RoutingControl(top_k=2)})]  # the stale one unheard


def test_the_report_comes_before_the_continuation_and_a_stale_one_is_never_decoded(loaded: LoadedModel) -> None:
    live = LiveSession(loaded, "a short prompt for the tuner", continuation=4)
    heard: list[tuple[str, ApplyResult]] = []
    live.on_result(lambda r: heard.append(("report", r)))
    live.on_continuation(lambda r: heard.append(("continuation", r)))
    live.update(routing={"all": RoutingControl(top_k=1)})
    (first, report), (second, done) = heard
    assert (first, second) == ("report", "continuation") and report.generation == done.generation
    assert report.continuation_pending and report.continuation_after == ()
    assert not done.continuation_pending and len(done.continuation_after) == 4
    want = live.session.full_run(Controls(routing={"all": RoutingControl(top_k=1)}))
    assert done.continuation_after == want.continuation_after and torch.equal(report.logits, want.logits)
    assert live.result == done  # what a late view (an export, a tab selected later) reads is the whole result
    # a change waiting when the report is out: that run's continuation is skipped, the newer run decodes its own
    background = LiveSession(loaded, "a short prompt for the tuner", continuation=4, background=True)
    decoded: list[int] = []
    real = background.session.finish_continuation
    background.session.finish_continuation = lambda g: decoded.append(g) or real(g)  # type: ignore[method-assign]
    background.on_result(lambda r: r.controls.routing["all"].top_k == 1 and background.update(
        routing={"all": RoutingControl(top_k=2)}))
    background.update(routing={"all": RoutingControl(top_k=1)})
    background.scheduler.flush()
    assert len(decoded) == 1 and background.result.controls.routing["all"].top_k == 2
    assert not background.result.continuation_pending


def test_latest_wins_in_the_foreground_and_after_a_failing_run() -> None:
    calls: list[int] = []
    inline = LatestWins(lambda: calls.append(threading.get_ident()), background=False)
    inline.trigger()
    assert calls == [threading.get_ident()] and not inline.superseded()  # ran in the caller's thread
    runs: list[int] = []

    def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("a listener failed")

    worker = LatestWins(flaky, background=True)
    worker.trigger()
    worker.flush()
    worker.trigger()  # the worker survived the failure
    worker.flush()
    assert runs == [0, 1]


def test_set_prompt_rebaselines_and_reapplies(live: LiveSession) -> None:
    live.update(routing={"all": RoutingControl(top_k=1)})
    prompts: list[str] = []
    live.on_prompt(lambda: prompts.append(live.prompt))
    live.set_prompt("another prompt entirely")
    assert prompts == ["another prompt entirely"]
    assert live.input_ids.shape[1] == len("another prompt entirely") + 1  # byte tokens + BOS
    assert live.result.controls == Controls(routing={"all": RoutingControl(top_k=1)})
    assert live.routing_trace().sizes["token"] == live.input_ids.shape[1]
    with pytest.raises(ValueError, match="non-empty string"):
        live.set_prompt("")
    assert live.prompt == "another prompt entirely"


def test_two_live_sessions_on_one_model_from_two_threads_give_their_serial_traces(loaded: LoadedModel) -> None:
    """Two dashboards (or two tabs of `workbench serve`) on one model, tracing from two threads at once: each trace
    holds exactly its own prompt's run. A trace listens on the shared model's probes and forward hooks, so without
    one lock per model a run of the other session lands in it (seen: a shape error from the other prompt)."""
    from workbench.run_lock import model_lock

    prompts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i, end=' ')\n"]
    lives = [LiveSession(loaded, prompt) for prompt in prompts]
    assert lives[0].lock is lives[1].lock is model_lock(loaded.model)
    assert model_lock(load_model("tiny-random").model) is not lives[0].lock
    requests = [Controls(routing={"all": RoutingControl(ablate=(e,))}) for e in range(3)]
    alone = {(p, r): live.trace_prompt(["expert_ids"], controls)
             for p, live in enumerate(lives) for r, controls in enumerate(requests)}
    got: list[tuple[int, int, object]] = []
    failures: list[BaseException] = []

    def drive(p: int) -> None:
        try:
            for _ in range(6):
                for r, controls in enumerate(requests):
                    got.append((p, r, lives[p].trace_prompt(["expert_ids"], controls)))
        except BaseException as e:  # reported below: an exception in a thread would otherwise vanish
            failures.append(e)

    threads = [threading.Thread(target=drive, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and len(got) == 2 * 6 * len(requests)
    for p, r, ds in got:
        want = alone[p, r]
        assert ds.sizes["token"] == want.sizes["token"] == lives[p].input_ids.shape[1], (p, r)
        np.testing.assert_array_equal(ds.expert_ids.values, want.expert_ids.values)
        np.testing.assert_array_equal(ds.token_id.values, want.token_id.values)


def test_a_notebook_run_on_another_thread_does_not_reach_the_dashboards_routing_capture(
        loaded: LoadedModel) -> None:
    """The dashboard captures routing on its own thread while a notebook cell runs the same model directly (no
    lock): the capture keeps only its own run's values."""
    live = LiveSession(loaded, "def add(a, b):\n    return a + b\n")
    want = live._capture_routing(Controls())
    other = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    stop = threading.Event()

    def notebook_cell() -> None:
        while not stop.is_set():
            loaded.model(other)

    cell = threading.Thread(target=notebook_cell)
    cell.start()
    try:
        got = [live._capture_routing(Controls()) for _ in range(15)]
    finally:
        stop.set()
        cell.join(60)
    for ds in got:
        np.testing.assert_array_equal(ds.expert_ids.values, want.expert_ids.values)
