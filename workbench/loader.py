"""`load_model()`: the one entry point that turns a name or a path into (model, tokenizer).

"default" is the bundled model. Until the trained one ships it is the `tiny` preset with seeded random weights and
the byte tokenizer, so every feature runs end to end offline. A directory is read as an HF checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.config import PRESETS, ModelConfig
from workbench.model.transformer import DeepSeekModel
from workbench.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

DEFAULT_SEED = 0


@dataclass
class LoadedModel:
    model: DeepSeekModel
    tokenizer: Tokenizer
    name: str  # what was asked for: "default", a preset name, or the checkpoint path
    digest: str  # identifies the weights (sha256 of the safetensors index/file headers, or "random:<preset>:<seed>")


def load_model(name_or_path: str | Path = "default", *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    name = str(name_or_path)
    if name == "default" or name in PRESETS:
        preset = "tiny" if name == "default" else name
        config: ModelConfig = PRESETS[preset]
        if config.vocab_size < ByteTokenizer().vocab_size:
            raise ValueError(f"preset {preset!r}: vocab_size {config.vocab_size} is too small for the byte tokenizer")
        if preset != "tiny" and name != "default":
            raise ValueError(f"preset {preset!r} is a shape for memory maths; build it on the meta device with "
                             "workbench.checkpoint.build_meta(config) instead of loading random weights")
        model = DeepSeekModel.random(config, seed=DEFAULT_SEED).to(dtype)
        return LoadedModel(model, ByteTokenizer(config.bos_token_id or 0, _first(config.eos_token_id)), name,
                           f"random:{preset}:{DEFAULT_SEED}")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no model named {name!r}: not a preset ({sorted(PRESETS)}) and no such path")
    from workbench.checkpoint import checkpoint_digest, load_checkpoint

    model = load_checkpoint(path, dtype=dtype)
    tok_file = (path if path.is_dir() else path.parent) / "tokenizer.json"
    tokenizer: Tokenizer = HFTokenizer(tok_file) if tok_file.exists() else ByteTokenizer()
    return LoadedModel(model, tokenizer, name, checkpoint_digest(path))


def _first(x: int | list[int] | None) -> int:
    if isinstance(x, list):
        return x[0]
    return 1 if x is None else x
