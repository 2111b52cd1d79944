"""LiveSession's attention controls (V3.2/V4 sparse attention): composed with the others into `controls()`, validated
before anything changes, the same run as a fresh full run, kept across a new prompt, and saved as JSON."""

from __future__ import annotations

import pytest

from workbench.controls import AttentionControl, ControlError, Controls
from workbench.loader import LoadedModel
from workbench.widgets.live import LiveSession

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2 + "def f(x): return x * 2"  # ~100 byte tokens


def test_attention_entries_compose_into_controls_and_run_as_a_full_run(v4: LoadedModel) -> None:
    live = LiveSession(v4, PROMPT, continuation=0)
    live.update(attention={"all": AttentionControl(index_topk=4)})
    live.update(attention={2: AttentionControl(compressed=False)})
    want = Controls(attention={"all": AttentionControl(index_topk=4), 2: AttentionControl(compressed=False)})
    assert live.controls() == want and live.result.controls == want
    ref = live.session.full_run(want)
    assert live.result.kl == pytest.approx(ref.kl, abs=1e-6) and live.result.kl > 0
    assert dict(live.result.selection_change) == pytest.approx(dict(ref.selection_change), abs=1e-6)
    assert Controls.from_json(live.controls().to_json()) == want  # the JSON round trip a saved setting takes
    live.update(attention={"all": None, 2: None})
    assert live.controls() == Controls() and live.result.kl == 0.0


def test_an_impossible_attention_control_changes_nothing(v4: LoadedModel) -> None:
    live = LiveSession(v4, PROMPT, continuation=0)
    live.update(attention={"all": AttentionControl(sliding_window=8)})
    before = live.result
    with pytest.raises(ControlError, match=r"attention\[0\]: layer 0 is a deepseek_v4 sliding_attention layer"):
        live.update(attention={0: AttentionControl(index_topk=2)})  # layer 0 has no indexer
    with pytest.raises(ControlError, match="sliding_window=99 must be in 1..32"):
        live.update(attention={"all": AttentionControl(sliding_window=99)})
    assert live.attention == {"all": AttentionControl(sliding_window=8)} and live.result is before


def test_a_new_prompt_keeps_the_attention_controls(v4: LoadedModel) -> None:
    live = LiveSession(v4, PROMPT, continuation=0)
    live.update(attention={"all": AttentionControl(index_topk=2)})
    live.set_prompt(PROMPT.upper())
    assert live.result.controls == Controls.index_topk(2)
    assert live.result.kl == pytest.approx(live.session.full_run(Controls.index_topk(2)).kl, abs=1e-6)


def test_mla_models_refuse_attention_controls(loaded: LoadedModel) -> None:
    live = LiveSession(loaded, "a short prompt", continuation=0)
    with pytest.raises(ControlError, match=r"attention\['all'\]: no layer of this deepseek_v3 model"):
        live.update(attention={"all": AttentionControl(index_topk=2)})
    assert live.controls() == Controls()


def test_mhc_identity_entries_run_as_a_full_run_and_v3_refuses_them(v4: LoadedModel, loaded: LoadedModel) -> None:
    live = LiveSession(v4, PROMPT, continuation=0)
    live.update(mhc_identity={1: True}, attention={"all": AttentionControl(index_topk=8)})
    want = Controls(mhc_identity={1: True}, attention={"all": AttentionControl(index_topk=8)})
    assert live.controls() == want
    assert live.result.kl == pytest.approx(live.session.full_run(want).kl, abs=1e-6) and live.result.kl > 0
    v3 = LiveSession(loaded, "a short prompt", continuation=0)
    with pytest.raises(ControlError, match="mhc_identity: a deepseek_v4 control"):
        v3.update(mhc_identity={"all": True})
    assert v3.mhc_identity == {}
