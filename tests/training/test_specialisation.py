"""Expert/token-class mutual information: the vectorised MI equals the plain counter loop and known values;
token classes come from Python's own tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench.training.specialisation import (
    TOKEN_CLASSES,
    class_entropy,
    code_char_classes,
    expert_class_profile,
    mutual_information,
    mutual_information_ref,
    prose_char_classes,
    shuffled_baseline,
    token_classes,
)

CLS = {name: i for i, name in enumerate(TOKEN_CLASSES)}


def test_mi_matches_the_reference_loop_on_random_choices():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, size=(500, 4))  # [T, k]
    classes = rng.integers(0, 8, size=500)  # [T]
    assert mutual_information(ids, classes, 16, 8) == pytest.approx(mutual_information_ref(ids, classes), abs=1e-12)


def test_mi_known_values():
    classes = np.repeat(np.arange(4), 50)  # [200], 4 equally likely classes
    determined = classes[:, None]  # expert == class: MI = H(class) = 2 bits
    assert mutual_information(determined, classes, 4, 4) == pytest.approx(2.0)
    assert class_entropy(classes, 4) == pytest.approx(2.0)
    every_expert = np.tile(np.arange(4), (200, 1))  # each token picks all 4 experts: choice says nothing
    assert mutual_information(every_expert, classes, 4, 4) == pytest.approx(0.0, abs=1e-12)
    # two classes, expert 0 taken by 3/4 of class 0 and 1/4 of class 1: MI = 1 - H(1/4) bits
    c = np.repeat([0, 1], 4)
    e = np.array([0, 0, 0, 1, 0, 1, 1, 1])[:, None]
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert mutual_information(e, c, 2, 2) == pytest.approx(1 - h)


def test_shuffled_baseline_is_near_zero_for_structure_and_mi_far_above_it():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 8, size=4000)
    ids = (classes[:, None] * 2 + rng.integers(0, 2, size=(4000, 1))) % 16  # expert carries the class
    mi = mutual_information(ids, classes, 16, 8)
    mean, std = shuffled_baseline(ids, classes, 16, 8, shuffles=10)
    assert mi == pytest.approx(class_entropy(classes, 8), rel=1e-9)
    assert mean < 0.02 and mi > mean + 100 * std


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"classes has shape \(3,\)"):
        mutual_information(np.zeros((4, 2), dtype=int), np.zeros(3, dtype=int), 2, 2)


def test_code_classes_come_from_pythons_tokenizer():
    text = 'def fun(x):\n    return x + 12  # hi\ns = "ab"\n'
    chars = code_char_classes(text)
    expect = {"def": "keyword", "fun": "identifier", "(": "punctuation", "return": "keyword", "+": "punctuation",
              "12": "number", "# hi": "comment", '"ab"': "string", "    ": "whitespace"}
    for piece, cls in expect.items():
        at = text.index(piece)
        assert {TOKEN_CLASSES[c] for c in chars[at: at + len(piece)]} == {cls}, piece
    # a BPE-like token takes its first non-space character's class; pure spaces are whitespace
    offsets = [(0, 3), (3, 7), (11, 16), (16, 22)]  # "def", " fun", "\n    ", "return"
    assert [TOKEN_CLASSES[c] for c in token_classes(chars, text, offsets)] == \
        ["keyword", "identifier", "whitespace", "keyword"]


def test_unfinished_code_falls_back_to_character_rules():
    text = "x = (1,\n"  # unclosed bracket: tokenize raises at the end
    chars = code_char_classes(text)
    assert TOKEN_CLASSES[chars[0]] == "identifier" and TOKEN_CLASSES[chars[5]] == "number"


def test_prose_classes():
    text = "Use 3 words, please."
    got = [TOKEN_CLASSES[c] for c in prose_char_classes(text)]
    assert got[0] == "word" and got[3] == "whitespace" and got[4] == "number" and got[11] == "punctuation"


def test_expert_class_profile_rows_are_conditional_distributions():
    ids = np.array([[0, 1], [0, 2], [1, 2]])  # [T=3, k=2]
    classes = np.array([0, 1, 1])
    prof = expert_class_profile(ids, classes, 4, 2)
    np.testing.assert_allclose(prof, [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
