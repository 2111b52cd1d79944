"""The training loop: seeded and deterministic, writes a checkpoint our loader and transformers read, run log."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch

from workbench.config import PRESETS
from workbench.model.transformer import DeepSeekModel
from workbench.training.data import load_corpus
from workbench.training.train import RUN_LOG, TrainConfig, learning_rate, train

SLICE = ("Lib/this.py", "Lib/__future__.py", "Lib/keyword.py", "Lib/bisect.py", "pydoc_data.topics:pass")
TINY_RUN = TrainConfig(seed=3, vocab_size=300, steps=4, batch=2, seq_len=32, warmup=2, log_every=1, eval_every=2,
                       eval_windows=2, final_eval_windows=4)


@pytest.fixture(scope="module")
def tiny_slice():
    docs = [d for d in load_corpus() if d.name in SLICE]
    assert len(docs) == len(SLICE)
    return docs


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.log["records"]]


def test_same_seed_same_losses_other_seed_other_losses(tiny_slice):
    a = train(TINY_RUN, docs=tiny_slice, model_config=PRESETS["tiny"], progress=False)
    b = train(TINY_RUN, docs=tiny_slice, model_config=PRESETS["tiny"], progress=False)
    c = train(TrainConfig(**{**TINY_RUN.__dict__, "seed": 4}), docs=tiny_slice, model_config=PRESETS["tiny"],
              progress=False)
    assert _losses(a) == _losses(b)  # bit-identical: same seed, same threads, same data
    assert _losses(a) != _losses(c)
    assert len(a.log["records"]) == 4 and [e["step"] for e in a.log["evals"]] == [2, 4]
    for layer in PRESETS["tiny"].moe_layers:  # the bias was moved by hand, in gamma-sized sign steps
        bias = torch.tensor(a.log["final_bias"][str(layer)])
        assert bias.abs().max() <= TINY_RUN.steps * TINY_RUN.bias_gamma + 1e-9 and bias.abs().max() > 0
        assert torch.equal(a.model.layers[layer].mlp.gate.e_score_correction_bias, bias)


def test_written_checkpoint_loads_with_its_tokenizer_and_the_run_log(tmp_path, tiny_slice):
    from workbench.loader import load_model
    from workbench.tokenizer import HFTokenizer

    result = train(TINY_RUN, tmp_path, docs=tiny_slice, model_config=PRESETS["tiny"], progress=False)
    loaded = load_model(tmp_path)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    text = "import sys\n"
    assert loaded.tokenizer.encode(text) == result.tokenizer.encode(text, add_special_tokens=False).ids
    # the checkpoint is stored in bf16 (router and bias in fp32): the loaded model is the trained one rounded to bf16
    with torch.no_grad():
        for name, p in result.model.named_parameters():
            if not name.endswith("mlp.gate.weight"):
                p.copy_(p.to(torch.bfloat16).float())
        ids = torch.tensor([loaded.tokenizer.encode("def f(x):\n    return x\n")])
        torch.testing.assert_close(loaded.model(ids), result.model(ids), atol=1e-5, rtol=1e-5)
    log = json.loads((tmp_path / RUN_LOG).read_text())
    assert log["corpus"]["documents"] == len(tiny_slice) and log["corpus"]["digest"].startswith("sha256:")
    assert log["final_held_out_loss"] > 0 and log["tokens"]["seen"] == 4 * 2 * 32
    assert set(log["records"][0]["max_over_mean_load"]) == {str(l) for l in PRESETS["tiny"].moe_layers}


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_command_refuses_bad_arguments(tmp_path):
    from workbench.training import command

    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        command.run(argparse.Namespace(out=tmp_path, steps=0, seed=0, threads=1, quiet=True))
    with pytest.raises(ValueError, match="not a directory"):
        command.run(argparse.Namespace(out=afile, steps=1, seed=0, threads=1, quiet=True, arch="v4"))
    assert afile.read_text() == "x"


@pytest.mark.slow  # tokenizer on the full corpus + 20 steps of the real model: about a minute each
@pytest.mark.parametrize("name", ["default", "default-v3"])
def test_current_code_reproduces_the_bundled_runs_first_steps(name):
    """Each shipped checkpoint came from this code: its first 20 steps (inside the warm-up, where the learning rate
    does not depend on the total step count) give the logged losses (and V4's indexer KL) again."""
    from workbench.loader import BUNDLED_MODELS
    from workbench.training.data import corpus_manifest

    bundled = json.loads((BUNDLED_MODELS[name] / RUN_LOG).read_text())
    docs = load_corpus()
    if corpus_manifest(docs)["digest"] != bundled["corpus"]["digest"]:
        pytest.skip("this Python's standard library is not the corpus the bundled model was trained on")
    # run logs from before the V4 default have no "arch": they are V3 runs
    cfg = TrainConfig(**{"arch": "v3", **bundled["train_config"], "steps": 20, "eval_every": 1000})
    assert cfg.warmup >= 20 and cfg.arch == {"default": "v4", "default-v3": "v3"}[name]
    result = train(cfg, docs=docs, progress=False)
    logged = bundled["records"][:2]
    # same ops, same seed; another CPU's kernels may sum in another order, hence not bit-for-bit
    assert _losses(result) == pytest.approx([r["loss"] for r in logged], rel=1e-4)
    if name == "default":
        assert [r["indexer_kl"] for r in result.log["records"]] == pytest.approx([r["indexer_kl"] for r in logged],
                                                                                 rel=1e-4)


def test_v4_run_keeps_hash_tables_and_balances_only_learned_layers(tmp_path, tiny_slice):
    """A V4-style run: hash layers route by their fixed tid2eid (saved and reloaded as trained), only learned layers
    have a balancing bias (moved in gamma steps), and the checkpoint reloads to the trained model."""
    from workbench.loader import load_model

    cfg = PRESETS["tiny-v4"].replace(config_form="hf")
    result = train(TINY_RUN, tmp_path, docs=tiny_slice, model_config=cfg, progress=False)
    learned = [layer for layer in cfg.moe_layers if not cfg.is_hash_layer(layer)]
    assert sorted(int(k) for k in result.log["final_bias"]) == learned == [1, 2, 3]
    for layer in learned:
        bias = result.model.layers[layer].mlp.gate.e_score_correction_bias
        assert 0 < bias.abs().max() <= TINY_RUN.steps * TINY_RUN.bias_gamma + 1e-9
    start = DeepSeekModel.random(cfg, seed=TINY_RUN.seed)
    loaded = load_model(tmp_path)
    assert loaded.model.config.is_v4 and loaded.model.config.is_hash_layer(0)
    table = result.model.layers[0].mlp.gate.tid2eid
    assert torch.equal(loaded.model.layers[0].mlp.gate.tid2eid, table)
    assert torch.equal(table, start.layers[0].mlp.gate.tid2eid)  # the init's table: training never moves it
    assert (table.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    trained, reloaded = result.model.state_dict(), loaded.model.state_dict()
    assert trained.keys() == reloaded.keys()
    for name, value in trained.items():  # stored as is (fp32: router, mHC, sinks, ...) or rounded to bf16
        got = reloaded[name]
        assert torch.equal(got, value) or torch.equal(got, value.to(torch.bfloat16).to(value.dtype)), name
    ids = torch.tensor([loaded.tokenizer.encode("def f(x):\n    return x\n" * 4)])
    with torch.no_grad():
        assert not torch.allclose(loaded.model(ids), start(ids), atol=1e-3)  # and it was trained
