"""`workbench trace`: streaming a corpus, bad inputs, and a real SIGKILL followed by --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr
from trace_helpers import assert_same_trace, corpus

from workbench.cli import main
from workbench.trace import open_trace


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
    for needle in ("nope.txt: no such file", "dir.txt: cannot read it", "codec can't decode", ".txt or .jsonl",
                   "invalid site 'blocks.0.hook_z'"):
        assert needle in err
    assert not (tmp_path / "x.zarr").exists()
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


@pytest.mark.parametrize("sites", [["all"], ["router_scores", "blocks.1.attn.hook_kv_latent"]])
def test_sites_flag(tmp_path, sites):
    (tmp_path / "in.txt").write_text("abc\nde\n")
    assert trace_cli("--input", tmp_path / "in.txt", "--out", tmp_path / "t.zarr", "--sites", *sites) == 0
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
