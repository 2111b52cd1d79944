"""Do the routed experts specialise? Mutual information between expert choice and token class, per MoE layer.

Token classes come from the standard library's own `tokenize` / `keyword` for code and simple character rules for
prose, so the labels are not something the model could have shaped. A BPE token takes the class of its first
non-space character (all-space tokens are whitespace). Every (token, slot) choice is one sample of (expert, class):
MI = sum p(e, c) log2 p(e, c) / (p(e) p(c)) bits. A finite sample shows some MI even with no relation, so the
baseline is the same MI after permuting the classes over tokens (mean and std over several permutations).

Shape legend: T tokens, k experts per token, E experts, C classes.
"""

from __future__ import annotations

import argparse
import io
import keyword
import math
import re
import tokenize
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workbench.model.transformer import DeepSeekModel

TOKEN_CLASSES = ("keyword", "identifier", "punctuation", "number", "string", "comment", "whitespace", "word")
_CLS = {name: i for i, name in enumerate(TOKEN_CLASSES)}
_TOKENIZE_CLASS = {tokenize.OP: "punctuation", tokenize.NUMBER: "number", tokenize.STRING: "string",
                   tokenize.COMMENT: "comment", tokenize.NEWLINE: "whitespace", tokenize.NL: "whitespace",
                   tokenize.INDENT: "whitespace", tokenize.ERRORTOKEN: "punctuation"}
_SPACE, _LETTERS, _DIGITS = re.compile(r"\s+"), re.compile(r"[^\W\d_]+"), re.compile(r"\d+")
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python 3.12+ splits f-strings
    if hasattr(tokenize, _name):
        _TOKENIZE_CLASS[getattr(tokenize, _name)] = "string"


def prose_char_classes(text: str) -> np.ndarray:
    """Per character [len(text)]: whitespace, word (letters), number (digits) or punctuation (anything else)."""
    out = np.full(len(text), _CLS["punctuation"], dtype=np.int8)
    for pattern, cls in ((_SPACE, "whitespace"), (_LETTERS, "word"), (_DIGITS, "number")):
        for m in pattern.finditer(text):
            out[m.start(): m.end()] = _CLS[cls]
    return out


def code_char_classes(text: str) -> np.ndarray:
    """Per character [len(text)], from Python's tokenizer: keyword, identifier, punctuation (OP), number, string,
    comment, whitespace (indent, newlines, spaces between tokens). Characters the tokenizer never reaches (after a
    tokenize error) keep their prose class."""
    out = prose_char_classes(text)
    out[out == _CLS["word"]] = _CLS["identifier"]
    lines = io.StringIO(text).readlines()
    line_start = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(int)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                cls = "keyword" if keyword.iskeyword(tok.string) else "identifier"
            elif tok.type in _TOKENIZE_CLASS:
                cls = _TOKENIZE_CLASS[tok.type]
            else:
                continue  # DEDENT, ENDMARKER: empty spans
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 - 1 >= len(line_start) or r1 - 1 >= len(line_start):
                continue
            a, b = line_start[r0 - 1] + c0, line_start[r1 - 1] + c1
            out[a:b] = _CLS[cls]
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def token_classes(char_classes: np.ndarray, text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Class of each token [T]: the class of its first non-space character; whitespace when it has none."""
    out = np.empty(len(offsets), dtype=np.int8)
    for i, (a, b) in enumerate(offsets):
        cls = _CLS["whitespace"]
        for j in range(a, min(b, len(text))):
            if not text[j].isspace():
                cls = int(char_classes[j])
                break
        out[i] = cls
    return out


def mutual_information(expert_ids: np.ndarray, classes: np.ndarray, n_experts: int, n_classes: int) -> float:
    """MI in bits between the chosen expert and the token class; expert_ids [T, k], classes [T]."""
    T, k = expert_ids.shape
    if classes.shape != (T,):
        raise ValueError(f"classes has shape {classes.shape}, expected ({T},) to match expert_ids {expert_ids.shape}")
    pair = expert_ids.astype(np.int64).reshape(-1) * n_classes + np.repeat(classes.astype(np.int64), k)  # [T*k]
    joint = np.bincount(pair, minlength=n_experts * n_classes).reshape(n_experts, n_classes) / (T * k)  # [E, C]
    pe, pc = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)  # [E, 1], [1, C]
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pe @ pc)[nz])).sum())


def mutual_information_ref(expert_ids: np.ndarray, classes: np.ndarray) -> float:
    """The same MI with counters and a Python loop: the plain reference for `mutual_information`."""
    joint: Counter[tuple[int, int]] = Counter()
    for row, c in zip(expert_ids.tolist(), classes.tolist(), strict=True):
        for e in row:
            joint[(e, c)] += 1
    n = sum(joint.values())
    pe: Counter[int] = Counter()
    pc: Counter[int] = Counter()
    for (e, c), m in joint.items():
        pe[e] += m
        pc[c] += m
    return sum(m / n * math.log2((m / n) / ((pe[e] / n) * (pc[c] / n))) for (e, c), m in joint.items())


def shuffled_baseline(expert_ids: np.ndarray, classes: np.ndarray, n_experts: int, n_classes: int,
                      shuffles: int = 20, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the MI after permuting the classes over tokens: what chance alone gives on this sample."""
    rng = np.random.default_rng(seed)
    values = [mutual_information(expert_ids, rng.permutation(classes), n_experts, n_classes) for _ in range(shuffles)]
    return float(np.mean(values)), float(np.std(values))


def expert_class_profile(expert_ids: np.ndarray, classes: np.ndarray, n_experts: int, n_classes: int) -> np.ndarray:
    """p(class | expert) [E, C] over all (token, slot) choices; a row of zeros for an expert never chosen."""
    k = expert_ids.shape[1]
    pair = expert_ids.astype(np.int64).reshape(-1) * n_classes + np.repeat(classes.astype(np.int64), k)  # [T*k]
    joint = np.bincount(pair, minlength=n_experts * n_classes).reshape(n_experts, n_classes).astype(float)  # [E, C]
    return joint / np.maximum(joint.sum(axis=1, keepdims=True), 1)


def class_entropy(classes: np.ndarray, n_classes: int) -> float:
    """H(class) in bits: the most MI could be."""
    p = np.bincount(classes.astype(np.int64), minlength=n_classes) / len(classes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@dataclass
class RoutedTokens:
    classes: np.ndarray  # [T] index into TOKEN_CLASSES
    expert_ids: dict[int, np.ndarray]  # MoE layer -> [T, k]


def route_documents(model: DeepSeekModel, tokenizer: object, docs: Sequence[object], *, seq_len: int = 256,
                    max_tokens: int = 40_000, per_doc_tokens: int | None = None) -> RoutedTokens:
    """Run documents (`workbench.training.data.Document`) through the model in windows of seq_len tokens and
    collect each token's class and its chosen experts per MoE layer: the first `per_doc_tokens` of each document
    (all when None), up to max_tokens in all."""
    classes: list[np.ndarray] = []
    ids: dict[int, list[np.ndarray]] = {}
    total = 0

    def keep(name: str, value: torch.Tensor) -> None:
        ids.setdefault(int(name.split(".")[1]), []).append(value.numpy().astype(np.int16))

    for doc in docs:
        text, kind = doc.text, doc.kind  # type: ignore[attr-defined]
        tok_ids, offsets = tokenizer.encode_with_offsets(text)  # type: ignore[attr-defined]
        chars = code_char_classes(text) if kind == "code" else prose_char_classes(text)
        cls = token_classes(chars, text, offsets)
        take = min(len(tok_ids), max_tokens - total, per_doc_tokens or len(tok_ids))
        for start in range(0, take, seq_len):
            window = torch.tensor([tok_ids[start: min(start + seq_len, take)]])
            with torch.no_grad(), model.probes.listen(["blocks.*.mlp.hook_expert_indices"], keep):
                model(window)
        classes.append(cls[:take])
        total += take
        if total >= max_tokens:
            break
    return RoutedTokens(np.concatenate(classes), {layer: np.concatenate(v) for layer, v in sorted(ids.items())})


def specialisation_table(routed: RoutedTokens, n_experts: int, shuffles: int = 20, seed: int = 0) -> list[dict[str, float]]:
    """Per MoE layer: MI (bits), shuffled mean and std, and the z-score of MI above the shuffles."""
    C = len(TOKEN_CLASSES)
    rows = []
    for layer, eids in routed.expert_ids.items():
        mi = mutual_information(eids, routed.classes, n_experts, C)
        mean, std = shuffled_baseline(eids, routed.classes, n_experts, C, shuffles, seed)
        rows.append({"layer": layer, "mi_bits": mi, "shuffled_mean": mean, "shuffled_std": std,
                     "z": (mi - mean) / max(std, 1e-12)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from workbench.loader import load_model
    from workbench.training.data import load_corpus, split_corpus

    p = argparse.ArgumentParser(prog="python -m workbench.training.specialisation", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' or a checkpoint directory with tokenizer.json")
    p.add_argument("--max-tokens", type=int, default=40_000, help="held-out tokens to route")
    p.add_argument("--per-doc-tokens", type=int, default=2048, help="at most this many tokens of each held-out document")
    p.add_argument("--shuffles", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also print each expert's most over-represented class")
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    _, held = split_corpus(load_corpus())
    routed = route_documents(loaded.model, loaded.tokenizer, held, max_tokens=args.max_tokens,
                             per_doc_tokens=args.per_doc_tokens)
    E = loaded.model.config.n_routed_experts
    print(f"{loaded.name} ({loaded.digest}): {len(routed.classes)} held-out tokens, H(class) = "
          f"{class_entropy(routed.classes, len(TOKEN_CLASSES)):.3f} bits")
    counts = np.bincount(routed.classes, minlength=len(TOKEN_CLASSES))
    print("classes: " + ", ".join(f"{n} {c / counts.sum():.1%}" for n, c in zip(TOKEN_CLASSES, counts, strict=True)))
    print(f"| MoE layer | MI (bits) | shuffled mean ± std ({args.shuffles} permutations) | (MI - mean) / std |")
    print("|---|---|---|---|")
    for row in specialisation_table(routed, E, args.shuffles, args.seed):
        print(f"| {row['layer']} | {row['mi_bits']:.4f} | {row['shuffled_mean']:.5f} ± {row['shuffled_std']:.5f} | "
              f"{row['z']:.0f} |")
    if args.profile:
        C = len(TOKEN_CLASSES)
        base = np.bincount(routed.classes, minlength=C) / len(routed.classes)  # [C]
        print("\nper expert: the class most over-represented among its tokens (share of its tokens, x its base rate)")
        for layer, eids in routed.expert_ids.items():
            prof = expert_class_profile(eids, routed.classes, E, C)  # [E, C]
            lift = prof / np.maximum(base, 1e-12)  # [E, C]
            cells = [f"e{e}: {TOKEN_CLASSES[int(lift[e].argmax())]} {prof[e, lift[e].argmax()]:.0%} "
                     f"(x{lift[e].max():.1f})" for e in range(E)]
            print(f"layer {layer}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
