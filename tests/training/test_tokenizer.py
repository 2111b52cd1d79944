"""The byte-level BPE trained with `tokenizers`: exact round trips, special tokens where the config expects them."""

from __future__ import annotations

import itertools

import pytest

from workbench.tokenizer import HFTokenizer, TokenizerError
from workbench.training.data import load_corpus
from workbench.training.tokenizer import BOS, EOS, train_bpe

AWKWARD = [
    "def f(x):\n\tif x:\n        return x  # comment\n\n\n",
    "naïve café — 日本語 😀 \u200b\r\n\x00\x1f",
    "    \n  \t \n",
    "",
    "a" * 500,
]


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    texts = [d.text for d in load_corpus()[:6]]
    tok = train_bpe(texts, 400)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip_is_exact(small_bpe, text):
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text
    assert "".join(small_bpe.token_text(i) for i in ids) == text or not text.isascii()


def test_offsets_cover_the_text_in_order(small_bpe):
    text = AWKWARD[0]
    ids, offsets = small_bpe.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a1 <= a2 for (a1, _), (a2, _) in itertools.pairwise(offsets))
    assert "".join(text[a:b] for a, b in offsets) == text  # ASCII: each char in exactly one token


def test_special_tokens_and_merges(small_bpe):
    assert small_bpe.token_id(BOS) == 0 and small_bpe.token_id(EOS) == 1
    assert small_bpe.vocab_size == 400
    assert len(small_bpe.encode("import os\n")) < len("import os\n")  # merges learned from the stdlib


def test_too_small_vocab_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_bpe(["abc"], 100)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=str(bad)):
        HFTokenizer(bad)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        HFTokenizer(tmp_path / "absent.json")
