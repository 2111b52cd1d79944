"""Model families: the registry keyed by HF model_type is how the model, the loader and the checkpoint find one."""

from __future__ import annotations

import pytest
import torch

from workbench.checkpoint import CheckpointError, CheckpointReader, build_meta, save_checkpoint
from workbench.config import PRESETS, ConfigError
from workbench.model import families
from workbench.model.block import Block
from workbench.model.costs import parameter_counts
from workbench.model.families import FAMILIES, Family, family_for
from workbench.model.transformer import DeepSeekModel


def test_registry_holds_v2_v3_and_v32() -> None:
    assert sorted(FAMILIES) == ["deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4"]
    for preset in ("deepseek-v2-lite", "deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"):
        cfg = PRESETS[preset]
        assert family_for(cfg.model_type).model_type == cfg.model_type


def test_unknown_model_type_names_the_known_families() -> None:
    with pytest.raises(ConfigError, match=r"'llama' has no model family here; known: "
                                          r"\['deepseek_v2', 'deepseek_v3', 'deepseek_v32', 'deepseek_v4'\]"):
        family_for("llama")


def test_the_model_is_built_by_its_family(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    v3 = FAMILIES["deepseek_v3"]

    def counting(config, layer, probes) -> Block:
        built.append(layer)
        return v3.build_block(config, layer, probes)

    monkeypatch.setitem(FAMILIES, "deepseek_v3", Family("deepseek_v3", "counting", counting))
    model = DeepSeekModel(PRESETS["tiny"])
    assert built == list(range(PRESETS["tiny"].num_hidden_layers))
    assert model.family.summary == "counting"


def test_checkpoint_reader_refuses_a_family_it_does_not_have(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PRESETS["tiny"].replace(model_type="deepseek_v2", topk_method="group_limited_greedy", scoring_func="softmax")
    save_checkpoint(DeepSeekModel.random(cfg), tmp_path)
    monkeypatch.delitem(families.FAMILIES, "deepseek_v2")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'deepseek_v2' has no model family"):
        CheckpointReader.open(tmp_path)


def test_v2_and_v3_differ_only_where_their_configs_do() -> None:
    """V2 has no balancing bias in its state dict; V3 does. Same modules otherwise."""
    v3 = DeepSeekModel(PRESETS["tiny"])
    v2 = DeepSeekModel(PRESETS["tiny"].replace(model_type="deepseek_v2", topk_method="group_limited_greedy",
                                               scoring_func="softmax"))
    extra = set(v3.state_dict()) - set(v2.state_dict())
    assert extra and all(n.endswith("gate.e_score_correction_bias") for n in extra)
    assert set(v2.state_dict()) <= set(v3.state_dict())
    assert torch.equal(torch.tensor(v2.config.moe_layers), torch.tensor(v3.config.moe_layers))


@pytest.mark.parametrize(("preset", "total", "active"), [
    ("deepseek-v3.2", 671e9, 37e9), ("deepseek-v4-flash", 284e9, 13e9), ("deepseek-v4-pro", 1.6e12, 49e9)])
def test_presets_build_on_the_meta_device_with_the_published_sizes(preset: str, total: float, active: float) -> None:
    # the whole module tree of the released model, no memory: the parameter count is the model's own, and the
    # published totals / active sizes (active without the input embedding, a lookup) come out of it
    cfg = PRESETS[preset]
    model = build_meta(cfg)
    n = sum(p.numel() for p in model.parameters())
    counts = parameter_counts(cfg)
    assert n == counts["total"]
    assert abs(n / total - 1) < 0.025, n
    assert abs((counts["active"] - counts["embedding"]) / active - 1) < 0.03, counts["active"]
    assert all(p.device.type == "meta" for p in model.parameters())
