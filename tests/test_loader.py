"""`load_model`: the bundled default, the random tiny model under its explicit name, paths, and clear errors for a
missing or corrupt bundled asset (the message names the file)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.fine_tune import write_fine_tune
from workbench import loader
from workbench.loader import BUNDLED_FILES, DEFAULT_MODEL_DIR, BundledModelError, load_model
from workbench.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture
def bundled_copy(tmp_path, monkeypatch):
    """A private copy of the bundled model that `load_model("default")` reads, safe to damage."""
    copy = tmp_path / "default-model"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    monkeypatch.setattr(loader, "DEFAULT_MODEL_DIR", copy)
    return copy


def test_default_is_the_bundled_checkpoint_and_loads_by_path_too():
    default = load_model()
    by_path = load_model(DEFAULT_MODEL_DIR)
    assert default.name == "default" and isinstance(default.tokenizer, HFTokenizer)
    assert default.digest == by_path.digest and default.digest.startswith("sha256:")
    ids = torch.tensor([default.tokenizer.encode("for i in range(10):\n")])
    with torch.no_grad():
        torch.testing.assert_close(default.model(ids), by_path.model(ids), atol=0, rtol=0)
    assert load_model(dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_fine_tune_of_the_same_shapes_is_another_model(tmp_path, monkeypatch):
    """The digest traces are checked against names the weights themselves, not their config and shapes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuned = write_fine_tune(tmp_path / "tuned")
    default, other = load_model(), load_model(tuned)
    assert other.model.config == default.model.config
    assert other.digest.startswith("sha256:") and other.digest != default.digest
    assert load_model(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "copy")).digest == default.digest


def test_tiny_random_is_the_seeded_random_preset():
    a, b = load_model("tiny-random"), load_model("tiny-random")
    assert isinstance(a.tokenizer, ByteTokenizer) and a.digest == "random:tiny:0"
    assert a.model.config.num_hidden_layers == 3 and a.model.config.n_routed_experts == 16
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_unknown_names_and_big_presets_are_refused():
    with pytest.raises(FileNotFoundError, match="no model named 'nonesuch'"):
        load_model("nonesuch")
    with pytest.raises(ValueError, match="build_meta"):
        load_model("deepseek-v3")


@pytest.mark.parametrize("fname", BUNDLED_FILES)
def test_missing_bundled_file_is_named(bundled_copy, fname):
    (bundled_copy / fname).unlink()
    with pytest.raises(BundledModelError, match=f"{bundled_copy / fname} is missing"):
        load_model()


def test_truncated_weights_are_named(bundled_copy):
    weights = bundled_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundledModelError, match="model.safetensors"):
        load_model()


def test_corrupt_config_is_named(bundled_copy):
    (bundled_copy / "config.json").write_text("{ not json")
    with pytest.raises(BundledModelError, match="config.json"):
        load_model()


def test_corrupt_or_mismatched_tokenizer_is_named(bundled_copy):
    tok = bundled_copy / "tokenizer.json"
    good = tok.read_text()
    tok.write_text(good[: len(good) // 3])
    with pytest.raises(BundledModelError, match="tokenizer.json"):
        load_model()
    from tokenizers import Tokenizer

    tok.write_text(good)
    bigger = Tokenizer.from_file(str(tok))
    bigger.add_tokens([f"<extra{i}>" for i in range(64)])  # ids past the model's embedding rows
    bigger.save(str(tok))
    with pytest.raises(BundledModelError, match="more than the model's vocab_size"):
        load_model()


# ---------------------------------------------------------------------- devices
def test_auto_device_is_cuda_else_mps_else_cpu() -> None:
    got = load_model("tiny-random", device="auto").model.lm_head.weight.device
    mps = torch.backends.mps.is_available()
    assert got.type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    assert loader.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("device", "message"), [
    ("bogus", "is not a torch device"),
    ("meta", "runs on 'cpu', 'cuda' or 'mps'"),
])
def test_bad_devices_are_refused_by_name(device: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model("tiny-random", device=device)


def test_a_device_this_machine_lacks_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"device 'cuda': torch.cuda.is_available\(\) is False"):
        load_model("tiny-random", device="cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS"):
            load_model("tiny-random", device="mps")
