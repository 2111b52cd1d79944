"""A fine-tune of the bundled model for the weight-identity tests: the same config.json and shapes, other values."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from workbench.loader import DEFAULT_MODEL_DIR


def write_fine_tune(folder: Path) -> Path:
    """A copy of the bundled checkpoint at `folder` with `embed_tokens` scaled by 1.01 (what any fine-tune changes)."""
    tuned = Path(shutil.copytree(DEFAULT_MODEL_DIR, folder))
    tensors = load_file(str(tuned / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 1.01
    save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return tuned
