"""The README's main job runs end to end and says what it measured; user errors are one clear line."""

from __future__ import annotations

from workbench.cli import main


def test_demo_summary_prints_routing_and_kv(capsys):
    assert main(["demo", "--summary", "--model", "tiny", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "routing (expert load per MoE layer" in out
    assert "layer 1:" in out and "layer 2:" in out
    assert "KV cache per token (bf16): MLA 240 B vs MHA 960 B (4.0x)" in out  # the tiny preset's shapes


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    assert main(["demo", "--summary", "--model", str(tmp_path / "nope")]) == 2
    assert "no model named" in capsys.readouterr().err
