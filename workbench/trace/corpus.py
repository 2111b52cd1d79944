"""The input corpus of a trace: records read from .txt / .jsonl files, cut into windows, packed into batches.

Design choices:
- The input is streamed record by record (.txt: one record per non-empty line; .jsonl: one object with a
  "text" field per line), cut into windows of at most `max_len` tokens; memory stays flat on any input size. A
  record is itself read and tokenized PIECE_CHARS characters at a time (see `iter_windows`): tokenizing a 50 MB
  line whole took 9 GB, as a tokenizer's encoding costs ~190 bytes per character.
- Several files are one corpus: record indices run on across them, in the order given.
- A `Position` (file, the text file's tell() cookie at a record's line, line number, record index) lets a cluster
  task start reading at its first record instead of re-reading everything before it; positions are taken only
  when asked for (the planning pass), because a text file's tell() costs ~18 us a call against ~0.3 us a line.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

Window = tuple[int, list[int]]  # (input record index, token ids)
PIECE_CHARS = 1 << 16  # a record is read and tokenized this many characters at a time: ~12 MB of tokenizer memory
# (a tokenizer's encoding costs ~190 bytes per character), while a tokenizer call costs ~0.1 ms, so the cuts are free


@dataclass(frozen=True)
class Position:
    """Where a record starts: file index into the inputs, its line's tell() cookie, line number, record index."""

    file: int
    cookie: int
    line: int
    record: int


Record = tuple[Position | None, Iterator[str]]  # (where it starts, when asked for; its text in pieces)


def iter_windows(inputs: Path | Sequence[Path], tokenizer: object, max_len: int, bos: int | None,
                 start: Position | None = None) -> Iterator[Window]:
    """Stream (record index, window token ids) from .txt / .jsonl files (from `start` on, when given), in memory
    that does not grow with a file or with a record.

    A record is read and tokenized PIECE_CHARS characters at a time, and each window is yielded as soon as it is
    full. Pieces are cut before a space that separates two non-space characters: a byte-level BPE pre-tokenizer
    (GPT-2, Llama 3, DeepSeek; a word takes at most one leading space, no token ends in one) never merges across
    such a space, so the tokens equal those of the record tokenized whole. Only a run of more than PIECE_CHARS/2
    characters without such a space (CJK text, base64) is cut where the piece is full, and only the tokens at that
    cut may differ. Held whole anyway: a .jsonl line (it has to be parsed; its text is then cut the same way), and
    the leading whitespace of a .txt line (until its first non-space character shows it is not blank).
    A leading UTF-8 BOM is not part of the first record; bad UTF-8 is a ValueError naming file, line and byte.
    """
    encode: Callable[[str], list[int]] = tokenizer.encode  # type: ignore[attr-defined]
    for record, (_, chunks) in iter_records(inputs, start):
        for ids in _record_windows(_pieces(chunks), encode, max_len, bos):
            yield record, ids


def iter_records(inputs: Path | Sequence[Path], start: Position | None = None, positions: bool = False
                 ) -> Iterator[tuple[int, Record]]:
    """(record index, (position or None, text pieces)) over the inputs from `start`; exhaust each record's
    pieces before asking for the next record (both read the same file)."""
    files = [inputs] if isinstance(inputs, Path) else list(inputs)
    first = start or Position(0, 0, 1, 0)
    record = first.record
    for index in range(first.file, len(files)):
        path = files[index]
        at = first if index == first.file else Position(index, 0, 1, record)
        try:
            with path.open(encoding="utf-8-sig") as f:
                if at.cookie:
                    f.seek(at.cookie)
                reader = _jsonl_records if path.suffix == ".jsonl" else _txt_records
                for pos, chunks in reader(f, path, at.line, positions):
                    yield record, (None if pos is None else Position(index, pos[0], pos[1], record),
                                   _decoded(chunks, path))
                    record += 1
        except UnicodeDecodeError:
            raise ValueError(_utf8_error(path)) from None


def _decoded(chunks: Iterator[str], path: Path) -> Iterator[str]:
    """A record's pieces, with bad UTF-8 met while reading them reported as `_utf8_error` does (the consumer
    reads them outside `iter_records`' own frame)."""
    try:
        yield from chunks
    except UnicodeDecodeError:
        raise ValueError(_utf8_error(path)) from None


def _txt_records(f: TextIO, path: Path, line: int, positions: bool
                 ) -> Iterator[tuple[tuple[int, int] | None, Iterator[str]]]:
    """Each non-blank line, as an iterator over its text read PIECE_CHARS characters at a time (exhaust it before
    asking for the next line: both read the same file)."""
    while True:
        at = (f.tell(), 0) if positions else None
        head = f.readline(PIECE_CHARS)
        if not head:
            return
        while not head.strip() and not head.endswith("\n"):  # blank so far: read on to its first non-space
            more = f.readline(PIECE_CHARS)
            if not more:
                break
            head += more
        if head.strip():
            yield at, _rest_of_line(f, head)


def _jsonl_records(f: TextIO, path: Path, line: int, positions: bool
                   ) -> Iterator[tuple[tuple[int, int] | None, Iterator[str]]]:
    lineno = line - 1
    while True:
        at = f.tell() if positions else 0
        text_line = f.readline()
        if not text_line:
            return
        lineno += 1
        if not text_line.strip():
            continue
        try:
            obj = json.loads(text_line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
        del text_line, obj  # only the text stays while it is tokenized
        yield ((at, lineno) if positions else None), iter((text,))


def _rest_of_line(f: TextIO, piece: str) -> Iterator[str]:
    while not piece.endswith("\n"):
        yield piece
        piece = f.readline(PIECE_CHARS)
        if not piece:
            return
    yield piece[:-1]


def _pieces(chunks: Iterable[str]) -> Iterator[str]:
    """A record's text, read in chunks of any length, re-cut into pieces of at most PIECE_CHARS characters (see
    `_cut`); always at least one piece, "" for an empty record."""
    size, rest = PIECE_CHARS, ""
    for chunk in chunks:
        text, start = rest + chunk, 0
        while len(text) - start > size:
            cut = _cut(text, start, start + size)
            yield text[start:cut]
            start = cut
        rest = text[start:]
    yield rest


def _cut(text: str, lo: int, hi: int) -> int:
    """Where the piece starting at `lo` ends: before the last space between two non-space characters in the second
    half of text[lo:hi] (no pre-token of a byte-level BPE spans one), else at `hi`. Needs len(text) > hi."""
    half = lo + (hi - lo) // 2
    i = text.rfind(" ", half, hi)
    while i > half:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", half, i)
    return hi


def _record_windows(pieces: Iterable[str], encode: Callable[[str], list[int]], max_len: int, bos: int | None
                    ) -> Iterator[list[int]]:
    """The record's tokens (BOS first) in windows of `max_len`, each yielded as soon as it is full: the same
    windows as cutting the whole record's tokens, holding at most one piece's tokens."""
    ids: list[int] = [bos] if bos is not None else []
    for piece in pieces:
        ids += encode(piece)
        full = len(ids) - len(ids) % max_len
        for start in range(0, full, max_len):
            yield ids[start:start + max_len]
        del ids[:full]
    if ids:
        yield ids


def _utf8_error(path: Path) -> str:
    """`FILE:LINE: not valid UTF-8 (byte offset N)` for the first invalid byte of the file (N from the start of
    the file). The text reader decodes ahead of the line it returns, so its own error tells neither; lines are
    counted as it splits them (\\n, \\r\\n or \\r)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, after_cr = 1, 0, False
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # bytes of a character the previous block cut
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                line += _line_breaks(e.object[:e.start].decode("utf-8"), after_cr)
                return f"{path}:{line}: not valid UTF-8 (byte offset {offset - held + e.start})"
            if not block:
                return f"{path}: not valid UTF-8"  # not found again: the file changed while it was read
            line += _line_breaks(text, after_cr)
            after_cr = text.endswith("\r") if text else after_cr
            offset += len(block)


def _line_breaks(text: str, after_cr: bool) -> int:
    """Line breaks in `text` as universal newlines count them; `after_cr`: the text before ended in \\r (so a
    leading \\n completes that break)."""
    n = text.count("\n") + text.count("\r") - text.count("\r\n")
    return n - int(after_cr and text.startswith("\n"))


def iter_batches(windows: Iterator[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Greedy packing: add windows while the batch stays within batch_tokens (always at least one)."""
    batch: list[Window] = []
    size = 0
    for w in windows:
        if batch and size + len(w[1]) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(w)
        size += len(w[1])
    if batch:
        yield batch




def check_input(path: Path) -> None:
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--input {path}: expected a .txt or .jsonl file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"--input {path}: cannot read it ({e.strerror or e})") from None
