"""KVCompression's live truncation of V3.2 / V4 sparse attention: each knob runs what `Session.full_run` and a fresh
forward run with the same AttentionControl, the changed-selection figure is a count over the indexer's picks, bad
values are refused with the state kept, the index_topk sweep equals independent full runs, and the panel mirrors
and exports. V2/V3 get no panel."""

from __future__ import annotations

import html as html_lib
import re

import pytest
import torch

from workbench.config import PRESETS
from workbench.controls import AttentionControl, Controls
from workbench.loader import LoadedModel
from workbench.model.transformer import DeepSeekModel
from workbench.widgets.app import mirror
from workbench.widgets.kv_compression import KVCompression
from workbench.widgets.kv_truncation import topk_ladder
from workbench.widgets.live import LiveSession

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2 + "def f(x): return x * 2"  # 113 tokens with BOS
CSA_LAYERS = (1, 3)  # tiny-v4: 0 window-only, 1 CSA, 2 HCA, 3 CSA


@pytest.fixture
def view(v4: LoadedModel) -> KVCompression:
    return KVCompression(live=LiveSession(v4, PROMPT, continuation=0))


def attr(html: str, name: str) -> str:
    m = re.search(rf'class="wb-kv-sparse-result"[^>]* {name}="([^"]*)"', html)
    assert m, name
    return html_lib.unescape(m.group(1))


@torch.no_grad()
def forward(live: LiveSession, controls: Controls) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A fresh forward of the prompt: the last position's log-probs [V] and each indexer layer's picks [S, k]."""
    cfg = live.config
    picks: dict[int, torch.Tensor] = {}
    names = [f"blocks.{layer}.attn.hook_index_selected" for layer in CSA_LAYERS]
    resolved = controls.resolve(cfg)
    with live.model.probes.listen(names, lambda n, v: picks.__setitem__(int(n.split(".")[1]), v[0].clone()),
                                  own_thread=True):
        logits = live.model(live.input_ids, controls=resolved)
    return logits[0, -1].float().log_softmax(-1), picks


def changed_picks(before: torch.Tensor, after: torch.Tensor, n_entries: int) -> float:
    """Mean over queries that read any entry of 1 - |shared picks| / max(|before|, |after|), counted with sets."""
    fractions = []
    for b, a in zip(before.tolist(), after.tolist(), strict=True):
        sb, sa = {p for p in b if 0 <= p < n_entries}, {p for p in a if 0 <= p < n_entries}
        if sb or sa:
            fractions.append(1 - len(sb & sa) / max(len(sb), len(sa)))
    return sum(fractions) / len(fractions)


def test_index_topk_slider_equals_a_fresh_forward_and_counts_changed_picks(view: KVCompression) -> None:
    live, panel = view.live, view.sparse
    assert panel is not None and (panel.index_topk.min, panel.index_topk.max) == (1, live.config.index_topk)
    assert "no MLA latent" in view.error.value  # V4 still says so
    base_logp, base_picks = forward(live, Controls())
    for k in (4, 1):
        panel.set_index_topk(k)
        assert live.controls() == Controls(attention={layer: AttentionControl(index_topk=k) for layer in CSA_LAYERS})
        full = live.session.full_run(Controls.index_topk(k))  # the "all" short form: the same run
        logp, picks = forward(live, Controls.index_topk(k))
        kl = float((base_logp.exp() * (base_logp - logp)).sum())
        assert live.result.kl == pytest.approx(full.kl, abs=1e-6) == pytest.approx(kl, abs=1e-6)
        assert float(attr(panel.result.value, "data-kl")) == pytest.approx(kl, abs=1e-6) and kl > 0
        assert float(attr(panel.result.value, "data-loss-delta")) == pytest.approx(
            float(full.loss_delta.mean()), abs=1e-6)
        N = live.input_ids.shape[1] // 4
        want = {layer: changed_picks(base_picks[layer], picks[layer], N) for layer in CSA_LAYERS}
        assert dict(live.result.selection_change) == pytest.approx(want, abs=1e-6)
        assert float(attr(panel.result.value, "data-selection-change")) == pytest.approx(
            sum(want.values()) / 2, abs=1e-5)
        assert attr(panel.result.value, "data-next-after") == live.tokenizer.token_text(int(logp.argmax()))
        assert attr(panel.result.value, "data-next-before") == live.tokenizer.token_text(int(base_logp.argmax()))
    panel.set_index_topk(live.config.index_topk)  # the model's own budget: back to the baseline
    assert live.controls() == Controls() and live.result.kl == 0.0


def test_window_slider_and_dropped_branches_equal_full_runs(view: KVCompression) -> None:
    live, panel = view.live, view.sparse
    assert panel is not None and set(panel.drop) == {"compressed_sparse_attention", "heavily_compressed_attention"}
    panel.set_window(8)
    assert live.result.kl == pytest.approx(live.session.full_run(Controls.sliding_window(8)).kl, abs=1e-6)
    panel.set_window(32)
    panel.drop["heavily_compressed_attention"].value = True
    want = Controls(attention={2: AttentionControl(compressed=False)})
    assert live.controls() == want
    logp, _ = forward(live, want)
    base_logp, _ = forward(live, Controls())
    assert live.result.kl == pytest.approx(float((base_logp.exp() * (base_logp - logp)).sum()), abs=1e-6)
    panel.set_index_topk(4)
    panel.drop["compressed_sparse_attention"].value = True  # CSA reads no entries: its budget no longer applies
    want = Controls(attention={1: AttentionControl(compressed=False), 2: AttentionControl(compressed=False),
                               3: AttentionControl(compressed=False)})
    assert live.controls() == want
    assert live.result.kl == pytest.approx(live.session.full_run(want).kl, abs=1e-6)
    assert dict(live.result.selection_change) == {1: 1.0, 3: 1.0}  # every query that read entries reads none
    assert "compressed branch dropped in CSA/HCA" in panel.result.value


def test_bad_values_are_refused_and_the_state_kept(view: KVCompression) -> None:
    live, panel = view.live, view.sparse
    assert panel is not None
    panel.set_index_topk(8)
    before = live.result
    with pytest.raises(ValueError, match=r"index_topk=0 must be an int in 1..16"):
        panel.set_index_topk(0)
    with pytest.raises(ValueError, match=r"window=33 must be an int in 1..32"):
        panel.set_window(33)
    assert live.result is before and panel.index_topk.value == 8
    # another view asks for dense attention everywhere: a budget on top of it is refused, naming both
    panel.set_index_topk(16)
    live.update(attention={"all": AttentionControl(dense=True)})
    dense = live.result
    panel.set_index_topk(2)
    assert "attention for layer 1: index_topk and dense=True both set" in panel.message.value
    assert live.result is dense and panel.index_topk.value == 16  # the slider shows what runs
    assert live.attention == {"all": AttentionControl(dense=True)}
    panel.set_window(4)  # a knob that does not clash still works, and clears the message
    assert panel.message.value == "" and live.controls() == Controls(attention={
        "all": AttentionControl(dense=True), **{layer: AttentionControl(sliding_window=4) for layer in range(4)}})


def test_sweep_points_equal_independent_full_runs(view: KVCompression) -> None:
    live, panel = view.live, view.sparse
    assert panel is not None and topk_ladder(16) == [1, 2, 4, 8, 16]
    panel.set_index_topk(2)
    generation, controls = live.session.generation, live.controls()
    points = panel.run_sweep([1, 4, 16])
    assert live.session.generation == generation and live.controls() == controls  # the session left alone
    for k, kl in points:
        assert kl == pytest.approx(live.session.full_run(Controls.index_topk(k)).kl, abs=1e-9)
    assert points[-1][1] == pytest.approx(0.0, abs=1e-9) and points[0][1] > points[1][1] > 0
    assert len(re.findall(r'<circle [^>]*data-value=', panel.sweep.value)) == 2  # KL 0 is off the log axis
    with pytest.raises(ValueError, match=r"index_topk values \[17\] are outside 1..index_topk=16"):
        panel.run_sweep([17])


def test_panel_mirrors_and_exports(view: KVCompression, tmp_path) -> None:
    assert view.sparse is not None
    view.sparse.set_index_topk(3)
    mirror(view)
    page = view.save_html(tmp_path / "kv.html").read_text()
    assert 'class="wb-kv-sparse-result"' in page and f'data-kl="{view.live.result.kl:.9g}"' in page
    assert "index_topk: <b>3</b>" in page


def test_v32_has_the_latent_controls_and_index_topk(loaded: LoadedModel) -> None:
    cfg = PRESETS["tiny"].replace(model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=6)
    v32 = LoadedModel(DeepSeekModel.random(cfg, seed=1), loaded.tokenizer, "tiny-v32", "random:tiny-v32:1")
    live = LiveSession(v32, "the expert routes a token to latent space", continuation=0)
    view = KVCompression(live=live)
    assert view.has_latent and not view.rank.disabled and view.sparse is not None
    assert view.sparse.index_topk.max == 6 and view.sparse.drop == {} and view.sparse.window.disabled
    view.rank.value = 8
    view.sparse.set_index_topk(2)
    want = Controls(latent=live.latent, attention={layer: AttentionControl(index_topk=2) for layer in range(3)})
    assert live.controls() == want and set(live.latent) == {"all"}
    assert live.result.kl == pytest.approx(live.session.full_run(want).kl, abs=1e-6)
    assert live.result.selection_change == live.session.full_run(want).selection_change
    with pytest.raises(ValueError, match="no sliding window"):
        view.sparse.set_window(2)


def test_mla_models_have_no_sparse_panel(live: LiveSession, tmp_path) -> None:
    view = KVCompression(live=live)
    assert view.sparse is None
    assert "wb-kv-sparse" not in view.save_html(tmp_path / "kv.html").read_text()
