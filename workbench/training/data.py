"""The training corpus: the running interpreter's standard library source and its English documentation topics.

Every Python install has both offline under the PSF licence, so the bundled model can be retrained anywhere without a
download. The corpus depends on the Python version, so `corpus_manifest` records the version and a digest of the
file list and contents. The held-out split is chosen by a hash of each document's name (not its position), so it
stays the same set of files when a version adds or removes modules.

Shape legend: N tokens in a stream, B batch, S sequence length.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

DocKind = Literal["code", "prose"]
HELD_OUT_EVERY = 16  # about 1 document in 16 is held out for perplexity


@dataclass(frozen=True)
class Document:
    name: str  # "Lib/os.py" or "pydoc_data.topics:assert"
    kind: DocKind
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(lib_dir: Path | None = None, *, include_topics: bool = True) -> list[Document]:
    """Lib/*.py of the running interpreter (sorted by name) and every `pydoc_data.topics` entry (sorted by key)."""
    lib_dir = stdlib_dir() if lib_dir is None else Path(lib_dir)
    files = sorted(lib_dir.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"{lib_dir}: no *.py files; is this the standard library directory?")
    docs = [Document(f"Lib/{f.name}", "code", f.read_text(encoding="utf-8", errors="replace")) for f in files]
    if include_topics:
        from pydoc_data.topics import topics

        docs += [Document(f"pydoc_data.topics:{key}", "prose", topics[key]) for key in sorted(topics)]
    return docs


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_corpus(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held_out) by name hash."""
    train = [d for d in docs if not is_held_out(d.name)]
    held = [d for d in docs if is_held_out(d.name)]
    if not train or not held:
        raise ValueError(f"split of {len(docs)} documents left an empty side (train {len(train)}, held out {len(held)})")
    return train, held


def corpus_manifest(docs: Sequence[Document]) -> dict[str, object]:
    """What the data was: Python version, document counts and a sha256 over every name and text (order included)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + hashlib.sha256(d.text.encode()).digest())
    train, held = split_corpus(docs)
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "documents": len(docs),
        "code_files": sum(d.kind == "code" for d in docs),
        "prose_topics": sum(d.kind == "prose" for d in docs),
        "characters": sum(len(d.text) for d in docs),
        "held_out": [d.name for d in held],
        "train_documents": len(train),
        "digest": "sha256:" + h.hexdigest(),
    }


def token_stream(docs: Sequence[Document], encode_batch: object, eos_id: int) -> torch.Tensor:
    """All documents' ids, each followed by EOS, as one int64 stream [N]. `encode_batch`: list[str] -> list[list[int]]."""
    encoded = encode_batch([d.text for d in docs])  # type: ignore[operator]
    ids: list[int] = []
    for seq in encoded:
        ids.extend(seq)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens [B, S+1] (inputs are [:, :-1], targets [:, 1:])."""
    if stream.numel() < seq_len + 2:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than one window of {seq_len + 1}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)  # [B]
    return torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])  # [B, S+1]


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, S+1] covering the stream from its start (held-out perplexity, deterministic)."""
    n = (stream.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"token stream of {stream.numel()} tokens holds no window of {seq_len + 1}")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]  # [W, S+1]
    return stream[idx]
