"""`load_model()`: the one entry point that turns a name or a path into (model, tokenizer).

- "default": the bundled trained model in `workbench/assets/default-model/` (a small DeepSeek-V4-style MoE trained
  on the Python standard library by `python -m workbench.training`; see docs/model-card.md), with its BPE tokenizer.
  "default-v3": its V3-style predecessor (MLA with a latent cache) in `workbench/assets/default-v3-model/`, trained
  on the same data with the same tokenizer by `python -m workbench.training --arch v3`.
- "tiny-random" (also "tiny"): the `tiny` preset with seeded random weights and the byte tokenizer, for tests and
  benchmarks that need a model whose shape is fixed and that costs nothing to build; "tiny-v4-random" (also
  "tiny-v4") the same for the V4-style `tiny-v4` preset.
- A directory (or a safetensors file): an HF checkpoint, with its `tokenizer.json` when there is one.
A bundled asset that is missing or unreadable raises an error naming the file, never a silently random model.
`LoadedModel.digest` names the weights by their bytes (`checkpoint_digest`), so a fine-tune of the same shapes is
another model to every trace check.

`device` puts the model on "cpu", "cuda" (or "cuda:N"), "mps", or "auto" (CUDA where available, else Apple's MPS,
else the CPU). The torch path runs on any of them; a device this machine does not have is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint import CheckpointError, checkpoint_digest, load_checkpoint
from workbench.config import PRESETS, ConfigError, ModelConfig
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError

DEFAULT_SEED = 0
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
DEFAULT_V3_MODEL_DIR = Path(__file__).parent / "assets" / "default-v3-model"
BUNDLED_MODELS = {"default": DEFAULT_MODEL_DIR, "default-v3": DEFAULT_V3_MODEL_DIR}  # name -> shipped directory
BUNDLED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
RANDOM_MODELS = {"tiny-random": "tiny", "tiny": "tiny",  # name -> preset built with seeded random weights
                 "tiny-v4-random": "tiny-v4", "tiny-v4": "tiny-v4"}


class BundledModelError(FileNotFoundError):
    """A file of the bundled model is missing or unreadable; the message names it."""


@dataclass
class LoadedModel:
    model: DeepSeekModel
    tokenizer: Tokenizer
    name: str  # what was asked for: "default", "default-v3", "tiny-random", or the checkpoint path
    digest: str  # identifies the weights: sha256 of config.json + every weight byte (cached), or "random:<preset>:<seed>"


def load_model(name_or_path: str | Path = "default", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """The model and tokenizer called `name_or_path` ("default", "default-v3", "tiny-random", "tiny-v4-random" or a
    checkpoint path), in `dtype` on `device`."""
    target = resolve_device(device)
    loaded = _load(name_or_path, dtype)
    loaded.model.checkpoint_digest = loaded.digest
    if target.type != "cpu":
        loaded.model.to(target)
    return loaded


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has: "auto" is CUDA, else MPS, else CPU; ValueError for one it lacks."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); use 'cpu', 'cuda', 'mps' or 'auto'") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch.cuda.is_available() is False on this machine; use 'cpu' or 'auto'")
    if target.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use 'cpu' or 'auto'")
    if target.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: the workbench runs on 'cpu', 'cuda' or 'mps'")
    return target


def _load(name_or_path: str | Path, dtype: torch.dtype) -> LoadedModel:
    name = str(name_or_path)
    if name == "default":  # looked up at call time, so a test can point it at a copy
        return _load_bundled(DEFAULT_MODEL_DIR, name, dtype)
    if name == "default-v3":
        return _load_bundled(DEFAULT_V3_MODEL_DIR, name, dtype)
    if name in RANDOM_MODELS:
        return _load_random(RANDOM_MODELS[name], name, dtype)
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is a shape for memory maths; build it on the meta device with "
                         "workbench.checkpoint.build_meta(config) instead of loading random weights")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no model named {name!r}: not {sorted(BUNDLED_MODELS)}, {sorted(RANDOM_MODELS)}, a preset "
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
    try:
        return _load_checkpoint(directory, name, dtype)
    except (CheckpointError, ConfigError, TokenizerError) as e:
        raise BundledModelError(f"bundled model {name!r} is unreadable: {e}") from None


def _load_checkpoint(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
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
