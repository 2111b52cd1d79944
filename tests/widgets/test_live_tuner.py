"""LiveTuner: each widget sends Session.apply exactly the control it stands for, per scope; impossible settings show
the ControlError and keep the last valid state; the report is the session's result."""

from __future__ import annotations

import html

import pytest

from workbench.controls import ControlError, Controls, LatentControl, RoutingControl
from workbench.widgets import LiveTuner
from workbench.widgets.live import LiveSession
from workbench.widgets.tuner import parse_bias_offsets


@pytest.fixture
def tuner_calls(live: LiveSession, monkeypatch: pytest.MonkeyPatch) -> tuple[LiveTuner, list[Controls]]:
    tuner = LiveTuner(live=live)
    calls: list[Controls] = []
    real = live.session.apply
    monkeypatch.setattr(live.session, "apply", lambda c, **kw: calls.append(c) or real(c, **kw))
    return tuner, calls


@pytest.mark.parametrize(("widget", "value", "want"), [
    ("top_k", 2, RoutingControl(top_k=2)),
    ("topk_group", 1, RoutingControl(topk_group=1)),
    ("scaling", 1.0, RoutingControl(routed_scaling_factor=1.0)),
    ("norm_topk_prob", "off", RoutingControl(norm_topk_prob=False)),
    ("shared", False, RoutingControl(shared_experts=False)),
    ("temperature", 0.5, RoutingControl(temperature=0.5)),
    ("ablate", (3, 7), RoutingControl(ablate=(3, 7))),
    ("force", (5,), RoutingControl(force=(5,))),
    ("bias", "3:+0.5, 7:-1", RoutingControl(bias_offset={3: 0.5, 7: -1.0})),
])
def test_each_widget_sends_its_control(tuner_calls: tuple[LiveTuner, list[Controls]], widget: str, value: object,
                                       want: RoutingControl) -> None:
    tuner, calls = tuner_calls
    getattr(tuner, widget).value = value
    assert calls == [Controls(routing={"all": want})]
    assert tuner.live.result.controls == calls[-1]
    assert f'data-generation="{tuner.live.result.generation}"' in tuner.report.value


def test_scopes_and_latent_rank_compose(tuner_calls: tuple[LiveTuner, list[Controls]]) -> None:
    tuner, calls = tuner_calls
    tuner.top_k.value = 3
    tuner.scope.value = 2
    assert tuner.top_k.value == 4  # layer 2 has no own entry yet: the widgets show the model's values
    tuner.ablate.value = (0,)
    tuner.latent_rank.value = 8
    assert calls[-1] == Controls(routing={"all": RoutingControl(top_k=3), 2: RoutingControl(ablate=(0,))},
                                 latent={"all": LatentControl(8)})
    tuner.scope.value = "all"
    assert (tuner.top_k.value, tuner.ablate.value) == (3, ())
    n = len(calls)
    tuner.scope.value = 2  # loading a scope into the widgets runs nothing
    assert len(calls) == n
    tuner.reset()
    assert calls[-1] == Controls() and tuner.live.result.kl == 0.0 and tuner.latent_rank.value == 32


def test_impossible_settings_keep_the_last_valid_state(tuner_calls: tuple[LiveTuner, list[Controls]]) -> None:
    tuner, calls = tuner_calls
    tuner.top_k.value = 2
    good = tuner.live.result
    tuner.ablate.value = tuple(range(15))  # 1 expert left, top_k 2
    assert "top_k=2 must be in 1..1" in tuner.error.value and "keeps its last valid controls" in tuner.error.value
    tuner.bias.value = "3=+1"
    assert "'3=+1' is not 'expert:offset'" in html.unescape(tuner.error.value)
    assert len(calls) == 1 and tuner.live.result is good
    assert tuner.live.controls() == Controls(routing={"all": RoutingControl(top_k=2)})
    tuner.ablate.value = ()
    tuner.bias.value = ""
    assert tuner.error.value == ""


def test_report_shows_the_session_result(tuner_calls: tuple[LiveTuner, list[Controls]]) -> None:
    tuner, _ = tuner_calls
    tuner.top_k.value = 1
    r = tuner.live.result
    assert f'data-kl="{r.kl:.6g}"' in tuner.report.value
    for layer, f in r.expert_change.items():
        assert f'data-layer="{layer}" data-value="{f:.6g}"' in tuner.report.value
    assert tuner.report.value.count('class="wb-tuner-dloss-bar"') == len(r.loss_delta)
    assert max(r.expert_change.values()) > 0.5  # top-1 of 4 changes most choices


def test_parse_bias_offsets() -> None:
    assert parse_bias_offsets(" ", 16) is None
    assert parse_bias_offsets("0:1, 15:-0.25", 16) == {0: 1.0, 15: -0.25}
    for bad, msg in [("16:1", "expert 16 is outside 0..15"), ("a:1", "'a:1' is not"), ("2:nan", "must be finite")]:
        with pytest.raises(ControlError, match=msg):
            parse_bias_offsets(bad, 16)
