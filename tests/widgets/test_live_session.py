"""LiveSession: controls compose and validate before running, a debounced burst runs once with the last value,
and a new prompt gives every listener a fresh baseline."""

from __future__ import annotations

import threading
import time

import pytest

from workbench.controls import ControlError, Controls, LatentControl, RoutingControl
from workbench.loader import LoadedModel
from workbench.session import ApplyResult
from workbench.widgets.live import Debouncer, LiveSession


def test_update_composes_and_refuses_impossible_controls(live: LiveSession) -> None:
    live.update(routing={"all": RoutingControl(top_k=2)})
    live.update(latent={"all": LatentControl(4)})
    assert live.result.controls == Controls(routing={"all": RoutingControl(top_k=2)}, latent={"all": LatentControl(4)})
    with pytest.raises(ControlError, match=r"routing\[0\]: layer 0 is a dense layer"):
        live.update(routing={0: RoutingControl(top_k=1)})
    assert live.controls() == live.result.controls  # nothing changed
    live.update(routing={"all": None}, latent={"all": None})
    assert live.result.controls == Controls() and live.result.kl == 0.0


def test_a_debounced_burst_runs_once_with_the_last_value(loaded: LoadedModel) -> None:
    live = LiveSession(loaded, "a short prompt", continuation=0, debounce_s=1.0)  # a burst well inside 1 s
    seen: list[ApplyResult] = []
    done = threading.Event()
    live.on_result(lambda r: (seen.append(r), done.set()))
    for k in (1, 2, 3, 2):
        live.update(routing={"all": RoutingControl(top_k=k)})
    assert done.wait(30)
    live.debouncer.flush()
    time.sleep(0.1)
    assert len(seen) == 1 and seen[0].controls == Controls(routing={"all": RoutingControl(top_k=2)})


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


def test_debouncer_rejects_negative_delay() -> None:
    with pytest.raises(ValueError, match=">= 0 seconds"):
        Debouncer(lambda: None, -1)
