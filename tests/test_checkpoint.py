"""Checkpoints: sharded round trips, FP8 block dequantization (partial blocks), MTP skip, meta, and bad files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_models import VARIANTS, build_hf, save_hf
from workbench.checkpoint import (
    CheckpointError,
    CheckpointReader,
    build_meta,
    dequantize_fp8_blocks,
    load_checkpoint,
    save_checkpoint,
)
from workbench.config import PRESETS
from workbench.model.transformer import DeepSeekModel


@pytest.fixture
def tiny():
    return DeepSeekModel.random(PRESETS["tiny"], seed=3)


def _ids(model, n=12):
    return torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


def test_single_and_sharded_round_trip(tmp_path, tiny):
    for sub, shard in (("single", None), ("sharded", 60_000)):
        save_checkpoint(tiny, tmp_path / sub, max_shard_bytes=shard)
        again = load_checkpoint(tmp_path / sub)
        assert torch.equal(again(_ids(tiny)), tiny(_ids(tiny)))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    # experts are stored per expert, as DeepSeek and transformers store them
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in index["weight_map"]


def test_transformers_loads_our_checkpoint(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    save_checkpoint(tiny, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids(tiny)).logits.float(), tiny(_ids(tiny)), atol=1e-4, rtol=1e-4)


def _blockwise_reference(w8: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(w8.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = w8[rows, cols].float() * s[i, j]
    return out


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (300, 200), (128, 256), (7, 130)])
def test_fp8_block_dequant_handles_partial_blocks(shape):
    gen = torch.Generator().manual_seed(0)
    w8 = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=gen) + 0.01
    assert torch.equal(dequantize_fp8_blocks(w8, s), _blockwise_reference(w8, s))
    with pytest.raises(CheckpointError, match="does not tile weight"):
        dequantize_fp8_blocks(w8, s[:, :1] if s.shape[1] > 1 else s[:1].repeat(3, 2))


def _quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape
    s = torch.empty(math.ceil(N / block), math.ceil(K / block))
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s[i, j] = blk.abs().max().clamp(min=1e-4) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_checkpoint_loads_dequantized(tmp_path, tiny):
    """A V3-style FP8 checkpoint: 2-D projection weights in e4m3 + weight_scale_inv; norms/gate/embeddings high."""
    save_checkpoint(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    expected = dict(tensors)
    fp8 = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight") and t.dim() == 2 and "gate.weight" not in name:
            q, s = _quantize_blocks(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            expected[name] = _blockwise_reference(q, s)
        else:
            fp8[name] = t
    save_file(fp8, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_checkpoint(tmp_path)
    reference = DeepSeekModel(model.config)
    reference.load_state_dict(load_checkpoint_state(expected, reference), strict=True)
    assert torch.equal(model(_ids(tiny)), reference.eval()(_ids(tiny)))
    assert not torch.equal(model(_ids(tiny)), tiny(_ids(tiny)))  # FP8 rounding really happened


def load_checkpoint_state(hf_tensors, model):
    """Stack per-expert tensors by hand (independent of checkpoint.py's table) for the reference model."""
    state = {}
    for name in model.state_dict():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        if ".mlp.experts." in name:
            n = model.config.n_routed_experts
            state[name] = torch.stack([hf_tensors[f"{hf.rsplit('.', 1)[0]}.{e}.{hf.rsplit('.', 1)[1]}.weight"]
                                       for e in range(n)])
        else:
            state[name] = hf_tensors.get(hf, model.state_dict()[name])
    return state


def test_mtp_layers_are_skipped_with_a_note(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    L = tiny.config.num_hidden_layers
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(4, 4)
    tensors[f"model.layers.{L}.enorm.weight"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match=rf"skipped 2 tensors of multi-token-prediction layers \[{L}\]"):
        model = load_checkpoint(tmp_path)
    assert torch.equal(model(_ids(tiny)), tiny(_ids(tiny)))


def test_reader_inspects_layer_by_layer_without_loading(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path, max_shard_bytes=50_000)
    reader = CheckpointReader.open(tmp_path)
    assert reader.shape("model.layers.1.mlp.experts.3.up_proj.weight") == (32, 64)
    layer = reader.layer(1)
    assert torch.equal(layer["model.layers.1.mlp.experts.3.up_proj.weight"], tiny.layers[1].mlp.experts.up_proj[3])
    assert all(n.startswith("model.layers.1.") for n in layer)


def test_meta_device_builds_v3_without_memory():
    model = build_meta(PRESETS["deepseek-v3"])
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 670e9 < n < 672e9  # DeepSeek-V3: 671B parameters in the main model (MTP excluded)


# ------------------------------------------------------------------------------------------------ bad input
def test_config_not_matching_weights(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.kv_a_layernorm.weight: shape \(32,\), the "
                                              r"config implies \(48,\); config.json does not match the weights"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.o_proj.weight" in msg
    assert "model.layers.2.mlp.experts.up_proj experts [7]" in msg
    assert "unexpected 1: ['model.layers.0.self_attn.surprise.weight']" in msg


def test_truncated_and_foreign_files(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    f.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_index_pointing_at_missing_shard(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path, max_shard_bytes=60_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shards that do not exist"):
        load_checkpoint(tmp_path)


def test_transformers_checkpoints_with_bf16_weights(tmp_path):
    """A bf16 checkpoint as transformers writes it loads in fp32 and in bf16."""
    _, model_type, overrides = VARIANTS[0]
    hf = build_hf(model_type, overrides).to(torch.bfloat16)
    save_hf(hf, tmp_path)
    m32 = load_checkpoint(tmp_path)
    m16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert m16.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert m16.layers[1].mlp.gate.weight.dtype == torch.float32  # router stays fp32, as DeepSeek keeps it
    ids = _ids(m32)
    assert (m16(ids) - m32(ids)).abs().max() < 0.25 * m32(ids).abs().max()
