"""Tokenizers the workbench can pair with a model.

`ByteTokenizer` maps UTF-8 bytes to ids 2..257 (0 = BOS, 1 = EOS): the tokenizer of the random default model, so a
prompt always encodes and every token has exact text. Real checkpoints bring their own `tokenizer.json`, loaded
with the `tokenizers` library (`HFTokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


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

        self._tok = _Tok.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))

    def token_text(self, token_id: int) -> str:
        return str(self._tok.decode([token_id]))
