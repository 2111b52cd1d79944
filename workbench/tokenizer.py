"""Tokenizers the workbench can pair with a model.

`HFTokenizer` reads a `tokenizer.json` (HF tokenizers format) with the `tokenizers` library: the bundled default
model's byte-level BPE and the tokenizers real checkpoints ship. `ByteTokenizer` maps UTF-8 bytes to ids 2..257
(0 = BOS, 1 = EOS): the tokenizer of the random `tiny-random` model, so a prompt always encodes and every token has
exact text. Both give character offsets per token (`encode_with_offsets`), which label tokens by what they cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...


class ByteTokenizer:
    offset = 2

    def __init__(self, bos_token_id: int = 0, eos_token_id: int = 1) -> None:
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.vocab_size = 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and, per id, the (start, end) characters of the text its byte belongs to."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b + self.offset)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset).decode("utf-8", "replace")

    def token_text(self, token_id: int) -> str:
        if token_id == self.bos_token_id:
            return "<bos>"
        if token_id == self.eos_token_id:
            return "<eos>"
        if not self.offset <= token_id < 256 + self.offset:
            return f"<{token_id}>"
        return bytes([token_id - self.offset]).decode("latin-1")


class HFTokenizer:
    """A `tokenizer.json` (HF tokenizers format) next to a checkpoint."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)
