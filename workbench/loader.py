"""`load_model()`: the one entry point that turns a name or a path into (model, tokenizer).

- "default": the bundled trained model in `workbench/assets/default-model/` (a small DeepSeek-V3-style MoE trained
  on the Python standard library by `python -m workbench.training`; see docs/model-card.md), with its BPE tokenizer.
- "tiny-random" (also "tiny"): the `tiny` preset with seeded random weights and the byte tokenizer, for tests and
  benchmarks that need a model whose shape is fixed and that costs nothing to build.
- A directory (or a safetensors file): an HF checkpoint, with its `tokenizer.json` when there is one.
A bundled asset that is missing or unreadable raises an error naming the file, never a silently random model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.config import PRESETS, ModelConfig
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError

DEFAULT_SEED = 0
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
BUNDLED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
RANDOM_MODELS = {"tiny-random": "tiny", "tiny": "tiny"}  # name -> preset built with seeded random weights


class BundledModelError(FileNotFoundError):
    """A file of the bundled model is missing or unreadable; the message names it."""


@dataclass
class LoadedModel:
    model: DeepSeekModel
    tokenizer: Tokenizer
    name: str  # what was asked for: "default", "tiny-random", or the checkpoint path
    digest: str  # identifies the weights (sha256 of config.json + safetensors headers, or "random:<preset>:<seed>")


def load_model(name_or_path: str | Path = "default", *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    name = str(name_or_path)
    if name == "default":
        return _load_bundled(DEFAULT_MODEL_DIR, name, dtype)
    if name in RANDOM_MODELS:
        return _load_random(RANDOM_MODELS[name], name, dtype)
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is a shape for memory maths; build it on the meta device with "
                         "workbench.checkpoint.build_meta(config) instead of loading random weights")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no model named {name!r}: not 'default', {sorted(RANDOM_MODELS)}, a preset "
                                f"({sorted(PRESETS)}) or an existing path")
    return _load_checkpoint(path, name, dtype)


def _load_random(preset: str, name: str, dtype: torch.dtype) -> LoadedModel:
    config: ModelConfig = PRESETS[preset]
    tok = ByteTokenizer(config.bos_token_id or 0, _first(config.eos_token_id))
    if config.vocab_size < tok.vocab_size:
        raise ValueError(f"preset {preset!r}: vocab_size {config.vocab_size} is too small for the byte tokenizer")
    model = DeepSeekModel.random(config, seed=DEFAULT_SEED).to(dtype)
    return LoadedModel(model, tok, name, f"random:{preset}:{DEFAULT_SEED}")


def _load_bundled(directory: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    for fname in BUNDLED_FILES:
        if not (directory / fname).is_file():
            raise BundledModelError(f"bundled model {name!r}: {directory / fname} is missing; the package install "
                                    "is incomplete (reinstall it, or retrain with `python -m workbench.training --out DIR`)")
    from workbench.checkpoint import CheckpointError
    from workbench.config import ConfigError

    try:
        return _load_checkpoint(directory, name, dtype)
    except (CheckpointError, ConfigError, TokenizerError) as e:
        raise BundledModelError(f"bundled model {name!r} is unreadable: {e}") from None


def _load_checkpoint(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from workbench.checkpoint import checkpoint_digest, load_checkpoint

    model = load_checkpoint(path, dtype=dtype)
    tok_file = (path if path.is_dir() else path.parent) / "tokenizer.json"
    tokenizer: Tokenizer = ByteTokenizer()
    if tok_file.exists():
        hf = HFTokenizer(tok_file)
        if hf.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"{tok_file}: {hf.vocab_size} tokens, more than the model's vocab_size "
                                 f"{model.config.vocab_size} in {path}")
        tokenizer = hf
    return LoadedModel(model, tokenizer, name, checkpoint_digest(path))


def _first(x: int | list[int] | None) -> int:
    if isinstance(x, list):
        return x[0]
    return 1 if x is None else x
