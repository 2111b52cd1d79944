"""The corpus: the interpreter's stdlib + pydoc topics, a stable held-out split, a manifest that tracks the data."""

from __future__ import annotations

import pytest
import torch

from workbench.training.data import (
    Document,
    corpus_manifest,
    eval_windows,
    is_held_out,
    load_corpus,
    sample_batch,
    split_corpus,
    stdlib_dir,
)


def test_corpus_is_the_running_stdlib_and_pydoc_topics():
    from pydoc_data.topics import topics

    docs = load_corpus()
    code = [d for d in docs if d.kind == "code"]
    prose = [d for d in docs if d.kind == "prose"]
    assert {d.name for d in code} == {f"Lib/{p.name}" for p in stdlib_dir().glob("*.py")}
    assert [d.text for d in prose] == [topics[k] for k in sorted(topics)]
    os_doc = next(d for d in code if d.name == "Lib/os.py")
    assert os_doc.text == (stdlib_dir() / "os.py").read_text(encoding="utf-8")


def test_split_is_by_name_disjoint_and_stable_under_removals():
    docs = load_corpus()
    train, held = split_corpus(docs)
    assert len(train) + len(held) == len(docs)
    assert not {d.name for d in train} & {d.name for d in held}
    assert {d.kind for d in held} == {"code", "prose"}  # perplexity covers both kinds of text
    # removing documents does not move any other document across the split (hash of the name, not the position)
    _, held_fewer = split_corpus(docs[::2])
    assert {d.name for d in held_fewer} == {d.name for d in held} & {d.name for d in docs[::2]}
    assert all(is_held_out(d.name) for d in held)


def test_manifest_records_python_and_changes_with_the_data():
    import platform

    docs = load_corpus()
    m = corpus_manifest(docs)
    assert m["python"] == platform.python_version()
    assert m["documents"] == len(docs) and m["code_files"] + m["prose_topics"] == len(docs)
    edited = [*docs[:-1], Document(docs[-1].name, docs[-1].kind, docs[-1].text + " ")]
    assert corpus_manifest(edited)["digest"] != m["digest"]
    assert corpus_manifest(list(docs))["digest"] == m["digest"]


def test_missing_stdlib_dir_and_empty_split_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_corpus(tmp_path)
    train_only = [d for d in load_corpus() if not is_held_out(d.name)][:3]
    with pytest.raises(ValueError, match="empty side"):
        split_corpus(train_only)


def test_batches_and_eval_windows_are_contiguous_slices_of_the_stream():
    stream = torch.arange(1000)
    gen = torch.Generator().manual_seed(0)
    batch = sample_batch(stream, 4, 16, gen)  # [B, S+1]
    assert batch.shape == (4, 17)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 16, dtype=torch.int64))
    again = sample_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    windows = eval_windows(stream, 16, max_windows=3)
    assert torch.equal(windows[:, 0], torch.tensor([0, 16, 32])) and windows.shape == (3, 17)
    with pytest.raises(ValueError, match="shorter than one window"):
        sample_batch(torch.arange(10), 1, 16, gen)
    with pytest.raises(ValueError, match="holds no window"):
        eval_windows(torch.arange(10), 16)
