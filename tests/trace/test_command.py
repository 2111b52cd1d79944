"""`workbench trace`: streaming a corpus (long records in pieces, in flat memory), bad inputs, the writer lock,
and a real SIGKILL followed by --resume."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from trace_helpers import assert_same_trace, corpus

from workbench.cli import main
from workbench.trace import command, open_trace
from workbench.trace import corpus as corpus_io
from workbench.trace.corpus import iter_windows


def trace_cli(*args: object) -> int:
    return main(["trace", "--no-progress", *map(str, args)])


def test_txt_and_jsonl_give_the_same_trace_and_plain_readers_agree(tmp_path, loaded):
    texts = corpus(20, seed=1)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(texts)))
    assert trace_cli("--input", tmp_path / "in.txt", "--out", tmp_path / "a.zarr", "--batch-tokens", 200,
                     "--chunk-tokens", 64) == 0
    assert trace_cli("--input", tmp_path / "in.jsonl", "--out", tmp_path / "b.zarr", "--batch-tokens", 200,
                     "--chunk-tokens", 64, "--max-seq-len", 16) == 0
    a, b = open_trace(tmp_path / "a.zarr"), open_trace(tmp_path / "b.zarr")
    want = np.concatenate([[0, *loaded.tokenizer.encode(s)] for s in texts])
    np.testing.assert_array_equal(a.token_id.values, want)
    np.testing.assert_array_equal(b.token_id.values, want)
    assert b.pos.max() == 15 and b.seq.max() > a.seq.max() and (a.doc.values == b.doc.values).all()
    plain = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)
    np.testing.assert_array_equal(plain.expert_ids.values, a.expert_ids.values)
    assert plain.attrs["complete"] is True


def test_bad_inputs_are_clear_errors(tmp_path, capsys, loaded):
    ok = tmp_path / "ok.txt"
    ok.write_text("hello\n")
    assert trace_cli("--input", tmp_path / "nope.txt", "--out", tmp_path / "x.zarr") == 2
    (tmp_path / "dir.txt").mkdir()
    assert trace_cli("--input", tmp_path / "dir.txt", "--out", tmp_path / "x.zarr") == 2
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert trace_cli("--input", tmp_path / "bin.txt", "--out", tmp_path / "y.zarr") == 2
    assert trace_cli("--input", tmp_path / "ok.csv", "--out", tmp_path / "x.zarr") == 2
    assert trace_cli("--input", ok, "--out", tmp_path / "x.zarr", "--sites", "blocks.0.hook_z") == 2
    err = capsys.readouterr().err
    for needle in ("nope.txt: no such file", "dir.txt: cannot read it", "bin.txt:1: not valid UTF-8 (byte offset 0)",
                   ".txt or .jsonl", "invalid site 'blocks.0.hook_z'"):
        assert needle in err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
    assert trace_cli("--input", ok, "--out", tmp_path / "z.zarr") == 0
    assert trace_cli("--input", ok, "--out", tmp_path / "z.zarr") == 2  # exists: refuse, keep it
    written = 1 + len(loaded.tokenizer.encode("hello"))  # BOS + the line
    assert "already exists" in capsys.readouterr().err and open_trace(tmp_path / "z.zarr").sizes["token"] == written


def test_a_bad_record_midway_keeps_the_batches_before_it(tmp_path, capsys):
    lines = [json.dumps({"text": s}) for s in corpus(8, seed=2)] + ["{broken", json.dumps({"text": "late"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert trace_cli("--input", tmp_path / "in.jsonl", "--out", tmp_path / "t.zarr", "--batch-tokens", 64) == 2
    assert "in.jsonl:9: not a JSON object" in capsys.readouterr().err
    ds = open_trace(tmp_path / "t.zarr")
    assert not ds.attrs["complete"] and ds.sizes["token"] > 0 and ds.doc.max() <= 7


def test_sigkill_mid_run_then_resume_gives_exactly_the_uninterrupted_trace(tmp_path):
    texts = corpus(60, seed=5, max_words=20)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    flags = ["--input", str(src), "--batch-tokens", "96", "--chunk-tokens", "64", "--no-progress"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "trace", *flags, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = int(zarr.open_group(killed, mode="r")["progress"][0, 0])
        except Exception:  # not created yet
            committed = 0
        if committed >= 200:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ds = open_trace(killed)
    assert not ds.attrs["complete"] and ds.sizes["token"] >= 200
    assert trace_cli(*flags, "--out", killed, "--resume") == 0
    assert trace_cli(*flags, "--out", tmp_path / "whole.zarr") == 0
    resumed, whole = open_trace(killed).compute(), open_trace(tmp_path / "whole.zarr").compute()
    assert resumed.attrs["complete"] and resumed.sizes["token"] == whole.sizes["token"]
    for name in ("token_id", "doc", "seq", "pos", "expert_ids", "expert_weights", "logprob", "pred_id"):
        np.testing.assert_array_equal(resumed[name].values, whole[name].values, err_msg=name)
    assert trace_cli(*flags, "--out", killed, "--resume") == 2  # finished: nothing more to do, nothing touched


def test_resume_refuses_a_changed_input(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(corpus(10, seed=7)) + "\n")
    out = tmp_path / "t.zarr"
    store_args = ["--input", src, "--out", out, "--batch-tokens", 64]
    from workbench.trace import command

    real = command.TraceStore.close
    command.TraceStore.close = lambda self, complete=True: real(self, complete=False)  # committed, not finished
    try:
        assert trace_cli(*store_args) == 0
    finally:
        command.TraceStore.close = real
    src.write_text("\n".join(corpus(10, seed=8)) + "\n")
    assert trace_cli(*store_args, "--resume") == 2
    assert "does not start with" in capsys.readouterr().err


def test_resume_refuses_another_checkpoint_of_the_same_shapes(tmp_path, capsys, monkeypatch):
    """A fine-tune (same config.json, same shapes, other weights) must not append its tokens to the original's store."""
    import shutil

    from tests.fine_tune import write_fine_tune
    from workbench.loader import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuned = write_fine_tune(tmp_path / "tuned")
    src = tmp_path / "in.txt"
    src.write_text("\n".join(corpus(10, seed=7)) + "\n")
    out = tmp_path / "t.zarr"
    store_args = ["--input", src, "--out", out, "--batch-tokens", 64]
    from workbench.trace import command

    real = command.TraceStore.close
    monkeypatch.setattr(command.TraceStore, "close", lambda self, complete=True: real(self, complete=False))
    assert trace_cli(*store_args) == 0  # committed by the bundled model, not finished
    tokens = open_trace(out).sizes["token"]
    assert trace_cli(*store_args, "--model", tuned, "--resume") == 2
    assert "holds a trace of another checkpoint (digest differs)" in capsys.readouterr().err
    assert open_trace(out).sizes["token"] == tokens  # nothing appended
    assert trace_cli(*store_args, "--model", shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "copy"), "--resume") == 0


@pytest.mark.parametrize("sites", [["all"], ["router_scores", "blocks.1.attn.hook_kv_latent"]])
def test_sites_flag(tmp_path, sites):
    (tmp_path / "in.txt").write_text("abc\nde\n")
    assert trace_cli("--input", tmp_path / "in.txt", "--out", tmp_path / "t.zarr", "--model", "default-v3", "--sites",
                     *sites) == 0  # kv_latent: an MLA model's
    ds = open_trace(tmp_path / "t.zarr")
    assert "router_scores" in ds and "kv_latent" in ds
    if sites != ["all"]:
        assert "expert_ids" not in ds and np.isnan(ds.kv_latent.sel(layer_all=0).values).all()


def test_two_shard_processes_fill_one_store_equal_to_a_single_writer_run(tmp_path):
    texts = corpus(40, seed=9, max_words=16)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    flags = ["--input", str(src), "--batch-tokens", "96", "--chunk-tokens", "32", "--no-progress"]
    sharded = tmp_path / "sharded.zarr"
    procs = [subprocess.Popen([sys.executable, "-m", "workbench.cli", "trace", *flags, "--out", str(sharded),
                               "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "as writer 0 of 2" in outs[0][0] and "as writer 1 of 2" in outs[1][0]
    assert trace_cli(*flags, "--out", tmp_path / "single.zarr") == 0
    got, want = open_trace(sharded).compute(), open_trace(tmp_path / "single.zarr").compute()
    g = zarr.open_group(sharded, mode="r")
    assert g.attrs["writers"] == 2 and got.attrs["complete"] and got.sizes["token"] == want.sizes["token"]
    assert min(int(n) for n in g["progress"][:, 0]) > 0  # both writers did work
    assert_same_trace(got, want)
    # a third writer of another plan cannot join, and a finished shard refuses to run again
    assert trace_cli(*flags, "--out", sharded, "--shard", "0/3", "--wait", "1") == 2
    assert trace_cli(*flags, "--out", sharded, "--shard", "1/2") == 2


def test_shard_flag_is_validated(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("abc\n")
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(SystemExit):
            trace_cli("--input", tmp_path / "in.txt", "--out", tmp_path / "t.zarr", "--shard", bad)
    assert "--shard '2/2': need N >= 1 and 0 <= I < N" in capsys.readouterr().err


# ---------------------------------------------------------------------- long records, in pieces
def whole_windows(path: Path, tokenizer, max_len: int, bos: int | None = 0) -> list[tuple[int, list[int]]]:
    """The reader as it was: every record read and tokenized whole, then cut into windows (the reference)."""
    out = []
    with path.open(encoding="utf-8") as f:
        record = 0
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"] if path.suffix == ".jsonl" else line.rstrip("\n")
            ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
            out += [(record, ids[i:i + max_len]) for i in range(0, len(ids), max_len)]
            record += 1
    return out


def typical_text(n_chars: int, seed: int = 0) -> str:
    """Prose-like text: words, punctuation, digits, contractions, non-Latin scripts, doubled spaces and tabs."""
    rng = random.Random(seed)
    words = ["the", "expert", "routes", "a", "token,", "to", "latent", "space.", "While", "loss", "falls", "it's",
             "(weights)", "scale:", "3.14", "2024", "Über", "naïve", "日本語", "привет", "e-mail", "x=y+1;", "--flag",
             "'quoted'", '"said"', "?!", "...", "a\tb", "  ", "\u00a0", "emoji🙂", "CamelCase", "snake_case"]
    out, size = [], 0
    while size < n_chars:
        out.append(rng.choice(words))
        size += len(out[-1]) + 1
    return " ".join(out)[:n_chars].strip()


class SpyTokenizer:
    """Records the length of every text it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def encode(self, text: str) -> list[int]:
        self.calls.append(len(text))
        return self.inner.encode(text)


def test_records_below_the_piece_size_give_the_tokens_of_the_whole_record(tmp_path, loaded):
    lines = [*corpus(15, seed=11), "  leading and trailing spaces  ", "\ttabbed", " ", "\t", "x"]
    endings = ["\n", "\r\n", "\r", "\n\n"]  # universal newlines, as the text reader has always split lines
    (tmp_path / "in.txt").write_bytes("".join(s + endings[i % 4] for i, s in enumerate(lines)).encode())
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in [*lines, ""]) + "\n")
    for name in ("in.txt", "in.jsonl"):
        for max_len in (3, 512):
            got = list(iter_windows(tmp_path / name, loaded.tokenizer, max_len, 0))
            assert got == whole_windows(tmp_path / name, loaded.tokenizer, max_len), (name, max_len)
    assert list(iter_windows(tmp_path / "in.txt", loaded.tokenizer, 4, None)) == whole_windows(
        tmp_path / "in.txt", loaded.tokenizer, 4, None)  # a model without BOS


def test_cutting_before_a_space_between_two_words_keeps_the_bundled_bpe_tokens(loaded):
    """The rule pieces are cut by, checked on the bundled byte-level BPE: tokenizing the two sides of every cut
    before a space between two non-space characters gives the tokens of the whole text; a cut after the space
    would not (which is why the space goes with the next piece)."""
    tok = loaded.tokenizer
    text = typical_text(20000, seed=3)
    whole = tok.encode(text)
    cuts = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", text)]
    assert len(cuts) > 1000
    for i in random.Random(0).sample(cuts, 300):
        assert tok.encode(text[:i]) + tok.encode(text[i:]) == whole, text[i - 20:i + 20]
    assert tok.encode("hello ") + tok.encode("world") != tok.encode("hello world")


def test_a_long_record_is_tokenized_in_pieces_with_the_tokens_of_the_whole_record(tmp_path, loaded, monkeypatch):
    monkeypatch.setattr(corpus_io, "PIECE_CHARS", 256)
    text = typical_text(40000, seed=5)
    for name, data in (("long.txt", f"short one\n{text}\nshort two\n"),
                       ("long.jsonl", "".join(json.dumps({"text": s}) + "\n" for s in ("short one", text, "two")))):
        path = tmp_path / name
        path.write_text(data)
        spy = SpyTokenizer(loaded.tokenizer)
        windows = iter_windows(path, spy, 64, 0)
        first, second = next(windows), next(windows)
        assert first == (0, [0, *loaded.tokenizer.encode("short one")])
        assert second[0] == 1 and sum(spy.calls) <= 9 + 3 * 256  # the long record's first window came early
        assert [first, second, *windows] == whole_windows(path, loaded.tokenizer, 64), name
        assert max(spy.calls) <= 256 and len(spy.calls) > 40000 / 256


def test_a_long_record_at_the_real_piece_size_matches_too(tmp_path, loaded):
    text = typical_text(5 * corpus_io.PIECE_CHARS + 123, seed=6)
    (tmp_path / "in.txt").write_text(text + "\n")
    spy = SpyTokenizer(loaded.tokenizer)
    assert list(iter_windows(tmp_path / "in.txt", spy, 512, 0)) == whole_windows(tmp_path / "in.txt",
                                                                                 loaded.tokenizer, 512)
    assert len(spy.calls) >= 5 and max(spy.calls) <= corpus_io.PIECE_CHARS


def test_a_record_without_spaces_is_cut_where_the_piece_is_full_and_keeps_every_character(tmp_path, loaded,
                                                                                          monkeypatch):
    """No space to cut at (CJK, base64): the cut falls where the piece is full; tokens next to it may differ
    from tokenizing the record whole, but the windows still hold the record's text exactly, in order."""
    monkeypatch.setattr(corpus_io, "PIECE_CHARS", 100)
    text = "".join(random.Random(1).choice("日本語のテキスト、句読点。abcXYZ0123+/=") for _ in range(3000))
    (tmp_path / "in.txt").write_text(text + "\n")
    spy = SpyTokenizer(loaded.tokenizer)
    windows = list(iter_windows(tmp_path / "in.txt", spy, 50, 0))
    assert max(spy.calls) <= 100 and len(spy.calls) == 30
    ids = [i for _, w in windows for i in w]
    assert ids[0] == 0 and loaded.tokenizer.decode(ids[1:]) == text
    assert all(len(w) == 50 for _, w in windows[:-1])


_MEMORY_CHILD = """
import inspect, json, resource, sys
from pathlib import Path
from workbench.loader import load_model
from workbench.trace.corpus import iter_windows
tok = load_model("default").tokenizer
small, big = Path(sys.argv[1]), Path(sys.argv[2])
list(iter_windows(small, tok, 512, 0))  # warm up: the tokenizer's own buffers are not the record's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gen = iter_windows(big, tok, 512, 0)
tokens = windows = 0
for _, ids in gen:
    tokens += len(ids)
    windows += 1
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
print(json.dumps({"generator": inspect.isgenerator(gen), "tokens": tokens, "windows": windows, "grown_mb": grown / 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_a_20_mb_line_is_read_in_flat_memory(tmp_path):
    """Peak RSS growth while streaming the windows of one 20 MB line: ~7 MB now (3.4 GB when the record was
    tokenized whole); the bound leaves room for allocator noise, not for anything proportional to the line."""
    (tmp_path / "small.txt").write_text("hello world\n")
    big = tmp_path / "big.txt"
    big.write_text(typical_text(20_000_000, seed=7) + "\n")
    assert big.stat().st_size > 20_000_000
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "small.txt"), str(big)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["generator"] and got["windows"] > 10000 and got["tokens"] > 5_000_000
    assert got["grown_mb"] < 200, got


# ---------------------------------------------------------------------- input errors
def test_bad_utf8_names_file_line_and_byte_even_far_into_the_file(tmp_path, loaded):
    """The text reader decodes ahead of the line it hands out, so the error is located again from the bytes: the
    line as the reader counts lines (\\n, \\r\\n, \\r), the offset from the start of the file, also past a
    character cut by the 1 MiB block boundary of that scan."""
    head = b"\xef\xbb\xbf" + b"".join(f"line {i} caf\u00e9\r\n".encode() if i % 3 else f"line {i}\r".encode()
                                 for i in range(60000))
    pad = (1 << 20) - len(head) - 1  # "\u00e9" below straddles byte 1 MiB
    assert pad > 0
    data = head + b"x" * pad + "\u00e9 ok\n".encode() + b"fine\nbad \xc3( here\n"
    bad = data.index(b"\xc3(")
    (tmp_path / "in.txt").write_bytes(data)
    line = len(re.findall(rb"\r\n|\r|\n", data[:bad])) + 1
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'in.txt'}:{line}: not valid UTF-8 (byte offset {bad})")):
        for _ in iter_windows(tmp_path / "in.txt", loaded.tokenizer, 512, 0):
            pass
    (tmp_path / "cut.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xe6\x97')  # ends inside a character
    with pytest.raises(ValueError, match=r"cut\.jsonl:2: not valid UTF-8 \(byte offset 24\)"):
        list(iter_windows(tmp_path / "cut.jsonl", loaded.tokenizer, 512, 0))


def test_a_leading_bom_is_not_part_of_the_first_record(tmp_path, loaded):
    texts = corpus(3, seed=12)
    for name, data in (("in.txt", "\n".join(texts) + "\n"),
                       ("in.jsonl", "".join(json.dumps({"text": s}) + "\n" for s in texts))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + data.encode())
        (tmp_path / f"plain{Path(name).suffix}").write_text(data)
        got = list(iter_windows(tmp_path / name, loaded.tokenizer, 512, 0))
        assert got == list(iter_windows(tmp_path / f"plain{Path(name).suffix}", loaded.tokenizer, 512, 0))
        assert got[0][1] == [0, *loaded.tokenizer.encode(texts[0])]


def test_a_run_that_fails_before_its_first_commit_leaves_no_store_and_the_fixed_rerun_needs_no_resume(
        tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.txt", tmp_path / "t.zarr"
    src.write_bytes(b"good line\nsecond \xff line\n")
    assert trace_cli("--input", src, "--out", out) == 2
    assert f"{src}:2: not valid UTF-8 (byte offset 17)" in capsys.readouterr().err and not out.exists()
    src.write_text("good line\nsecond line\n")
    assert trace_cli("--input", src, "--out", out) == 0 and open_trace(out).attrs["complete"]
    bad_json = tmp_path / "in.jsonl"
    bad_json.write_text("{broken\n")
    assert trace_cli("--input", bad_json, "--out", tmp_path / "j.zarr") == 2 and not (tmp_path / "j.zarr").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command.Trace, "forward", interrupted)
    assert trace_cli("--input", src, "--out", tmp_path / "k.zarr") == 130 and not (tmp_path / "k.zarr").exists()


def test_out_naming_a_file_is_a_clear_error_and_the_file_is_kept(tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "t.zarr"
    src.write_text("hello\n")
    out.write_text("my notes")
    for extra in ([], ["--resume"], ["--shard", "0/2", "--wait", "1"]):
        assert trace_cli("--input", src, "--out", out, *extra) == 2
        assert f"--out {out} is a file, not a trace store folder" in capsys.readouterr().err
    assert out.read_text() == "my notes"


def test_a_full_disk_while_the_store_is_created_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import zarr.storage._local as local

    src, out = tmp_path / "in.txt", tmp_path / "t.zarr"
    src.write_text("hello\n")
    real, calls = local._put, {"n": 0}

    def full_disk(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] >= 4:  # the group and a few arrays are on disk, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    assert trace_cli("--input", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"workbench trace: error: creating {out} failed (the disk is full)" in err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists() and calls["n"] >= 4
    monkeypatch.setattr(local, "_put", real)
    assert trace_cli("--input", src, "--out", out) == 0 and open_trace(out).attrs["complete"]


# ---------------------------------------------------------------------- the writer lock
_HOLDER = """
import sys, time
from pathlib import Path
from workbench.trace.writer_lock import WriterLock
lock = WriterLock(Path(sys.argv[1]), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_one_holds_the_store_and_a_killed_holder_does_not_block_resume(
        tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.txt", tmp_path / "t.zarr"
    src.write_text("\n".join(corpus(12, seed=13)) + "\n")
    flags = ["--input", src, "--out", out, "--batch-tokens", 64, "--chunk-tokens", 32]
    real = command.TraceStore.close
    with monkeypatch.context() as m:  # a run that committed its batches and stopped before finishing
        m.setattr(command.TraceStore, "close", lambda self, complete=True: real(self, complete=False))
        assert trace_cli(*flags) == 0
    before = zarr.open_group(out, mode="r")["progress"][:].tolist()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for extra in (["--resume"], []):
            assert trace_cli(*flags, *extra) == 2
            err = capsys.readouterr().err
            assert f"{out}: another writer holds it" in err and f"pid {holder.pid}" in err, err
        assert zarr.open_group(out, mode="r")["progress"][:].tolist() == before  # refused before touching it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert trace_cli(*flags, "--resume") == 0  # the OS dropped the killed holder's lock
    assert open_trace(out).attrs["complete"]
