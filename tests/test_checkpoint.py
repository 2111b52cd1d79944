"""Checkpoints: sharded round trips, FP8 block dequantization (partial blocks), FP8 models saved in DeepSeek-V3's
FP8 layout, MTP skip, meta, and bad files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tests.hf_models import VARIANTS, build_hf, save_hf
from workbench.checkpoint import (
    DIGEST_CACHE_NAME,
    CheckpointError,
    CheckpointReader,
    build_meta,
    checkpoint_digest,
    dequantize_fp8_blocks,
    digest_cache_paths,
    hf_state_dict,
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
    """Stack per-expert tensors by hand (independent of workbench.checkpoint's table) for the reference model."""
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
    _edit_config(tmp_path, num_nextn_predict_layers=1)  # DeepSeek-V3's config declares its one MTP module
    tensors = load_file(str(tmp_path / "model.safetensors"))
    L = tiny.config.num_hidden_layers
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(4, 4)
    tensors[f"model.layers.{L}.enorm.weight"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match=rf"skipped 2 tensors of multi-token-prediction layers \[{L}\]"):
        model = load_checkpoint(tmp_path)
    assert torch.equal(model(_ids(tiny)), tiny(_ids(tiny)))
    # a layer past the declared MTP ones is not MTP: the config does not describe these weights
    tensors[f"model.layers.{L + 1}.enorm.weight"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"config.json declares {L} layers \(\+ 1 multi-token-prediction\) "
                                              rf"but the weights hold layer {L + 1}"):
        load_checkpoint(tmp_path)


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    """3 layers declared, 4 in the file, no MTP declared: the real layer 3 must not be dropped as if it were MTP."""
    four = DeepSeekModel.random(PRESETS["tiny"].replace(num_hidden_layers=4), seed=1)
    save_checkpoint(four, tmp_path)
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"config.json declares 3 layers but the weights hold layer 3 "
                                              r"\(layers 0..3\); config.json does not match the weights"):
        load_checkpoint(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=5)  # and one more than the weights hold
    with pytest.raises(CheckpointError, match=r"declares 5 layers but the weights hold 4 \(layer 4 has no tensors\)"):
        load_checkpoint(tmp_path)


def test_a_config_of_20000_layers_fails_at_once(tmp_path, tiny):
    """The header names and shapes are checked before the model is built: no minutes of building 20,000 layers."""
    save_checkpoint(tiny, tmp_path)
    _edit_config(tmp_path, num_hidden_layers=20_000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="declares 20000 layers but the weights hold 3"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - start < 2.0
    # a wrong width fails as fast, with file and tensor named (the layer count here is right)
    _edit_config(tmp_path, num_hidden_layers=3, hidden_size=96, q_lora_rank=48)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model.safetensors: lm_head.weight: shape \(512, 64\), "
                                              r"the config implies \(512, 96\)"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - start < 2.0


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


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


# ------------------------------------------------------------------------------------------------ FP8 models saved
# Tiny configs for the FP8 layout. PARTIAL: every FP8 linear has a partial edge block and several have 2x2 grids
# (as V3's kv_a_proj_with_mqa 576 x 7168 does). BLOCKS: every quantized dim a multiple of 128 and several grids
# larger than 1x1, the shapes transformers' FP8 dequantization handles (it infers the block from the scale grid).
PARTIAL = dataclasses.replace(PRESETS["tiny"], hidden_size=160, intermediate_size=264, moe_intermediate_size=136,
                              q_lora_rank=144, num_attention_heads=6, num_key_value_heads=6)
BLOCKS = dataclasses.replace(PRESETS["tiny"], hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                             q_lora_rank=128, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=64,
                             qk_rope_head_dim=64, v_head_dim=64, kv_lora_rank=64)
V3_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def _quantize_blocks_ue8m0(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_quantize_blocks`, with each scale rounded up to a power of two (DeepSeek-V3.1's `scale_fmt: ue8m0`)."""
    s = torch.exp2(torch.ceil(torch.log2(_quantize_blocks(w, block)[1])))
    return _requantize(w, s, block), s


def _requantize(w: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    scale = s.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return (w / scale).to(torch.float8_e4m3fn)


def _write_fp8_source(model: DeepSeekModel, path: Path, ue8m0: bool = False) -> Path:
    """A V3-style FP8 checkpoint built by hand (not by save_checkpoint's FP8 code): every linear of attention, MLPs,
    shared and routed experts in e4m3 + fp32 weight_scale_inv; embeddings, norms, router and lm_head high."""
    save_checkpoint(model, path)
    fp8 = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        if name.endswith(("proj.weight", "proj_with_mqa.weight")):
            fp8[name], fp8[name + "_scale_inv"] = (_quantize_blocks_ue8m0 if ue8m0 else _quantize_blocks)(t)
        else:
            fp8[name] = t
    save_file(fp8, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {**V3_QUANT, **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def partial_source(tmp_path_factory):
    return _write_fp8_source(DeepSeekModel.random(PARTIAL, seed=5), tmp_path_factory.mktemp("partial_fp8"))


def _saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


@torch.no_grad()
@pytest.mark.parametrize("shard", [None, 300_000])
def test_keep_fp8_model_saves_the_fp8_checkpoint_it_was_read_from(tmp_path, partial_source, shard):
    kept = load_checkpoint(partial_source, keep_fp8=True)
    save_checkpoint(kept, tmp_path, max_shard_bytes=shard)
    # the files hold exactly the source's tensors: names, dtypes and bits (codes and scales of every expert)
    _assert_same_tensors(_saved_tensors(tmp_path), load_file(str(partial_source / "model.safetensors")))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == V3_QUANT
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3
        assert "model.layers.2.mlp.experts.15.down_proj.weight_scale_inv" in index["weight_map"]
    # (a) our loader reads it back to the same model: every FP8 code and scale, and the logits
    again = load_checkpoint(tmp_path, keep_fp8=True)
    _assert_same_tensors(again.state_dict(), kept.state_dict())
    assert again.layers[2].mlp.experts.down_proj.dtype == torch.float8_e4m3fn
    assert torch.equal(again(_ids(kept)), kept(_ids(kept)))
    # (b) dequantized, it gives the source's dequantized weights, and those are the blockwise products
    dequantized = load_checkpoint(tmp_path)
    _assert_same_tensors(dequantized.state_dict(), load_checkpoint(partial_source).state_dict())
    save_checkpoint(dequantized, tmp_path / "dequantized")  # its config still carries the source's quantization
    assert "quantization_config" not in json.loads((tmp_path / "dequantized" / "config.json").read_text())
    source = load_file(str(partial_source / "model.safetensors"))
    name = "model.layers.1.mlp.experts.9.down_proj.weight"
    assert torch.equal(dequantized.layers[1].mlp.experts.down_proj[9],
                       _blockwise_reference(source[name], source[name + "_scale_inv"]))


def _v3_fp8_layout(c) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of a DeepSeek-V3 FP8 checkpoint with config `c`, written out from the
    naming rules of DeepSeek's index (model.safetensors.index.json): every linear of attention, dense MLP, shared
    and routed experts (one entry per expert) as F8_E4M3 + an F32 `weight_scale_inv` of ceil(N/128) x ceil(K/128);
    embeddings, norms, router and lm_head in high precision (F32 here: the model is saved without a dtype)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def fp8(name: str, n: int, k: int) -> None:
        out[f"{name}.weight"] = ((n, k), "F8_E4M3")
        out[f"{name}.weight_scale_inv"] = ((math.ceil(n / 128), math.ceil(k / 128)), "F32")

    H, heads = c.hidden_size, c.num_attention_heads
    out["model.embed_tokens.weight"] = ((c.vocab_size, H), "F32")
    out["model.norm.weight"] = ((H,), "F32")
    out["lm_head.weight"] = ((c.vocab_size, H), "F32")
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = ((H,), "F32")
        q_dim = heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        if c.q_lora_rank:
            fp8(f"{p}.self_attn.q_a_proj", c.q_lora_rank, H)
            out[f"{p}.self_attn.q_a_layernorm.weight"] = ((c.q_lora_rank,), "F32")
            fp8(f"{p}.self_attn.q_b_proj", q_dim, c.q_lora_rank)
        else:
            fp8(f"{p}.self_attn.q_proj", q_dim, H)
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, H)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = ((c.kv_lora_rank,), "F32")
        fp8(f"{p}.self_attn.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        fp8(f"{p}.self_attn.o_proj", H, heads * c.v_head_dim)
        if layer < c.first_k_dense_replace:
            for proj, (n, k) in {"gate_proj": (c.intermediate_size, H), "up_proj": (c.intermediate_size, H),
                                 "down_proj": (H, c.intermediate_size)}.items():
                fp8(f"{p}.mlp.{proj}", n, k)
            continue
        out[f"{p}.mlp.gate.weight"] = ((c.n_routed_experts, H), "F32")
        out[f"{p}.mlp.gate.e_score_correction_bias"] = ((c.n_routed_experts,), "F32")
        inner, shared = c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
        for proj, (n, k) in {"gate_proj": (inner, H), "up_proj": (inner, H), "down_proj": (H, inner)}.items():
            for e in range(c.n_routed_experts):
                fp8(f"{p}.mlp.experts.{e}.{proj}", n, k)
        for proj, (n, k) in {"gate_proj": (shared, H), "up_proj": (shared, H), "down_proj": (H, shared)}.items():
            fp8(f"{p}.mlp.shared_experts.{proj}", n, k)
    return out


@pytest.mark.parametrize("config", [PARTIAL, dataclasses.replace(PRESETS["tiny"], q_lora_rank=None)],
                         ids=["partial-blocks-qlora", "tiny-no-qlora"])
def test_fp8_save_has_deepseek_v3_names_shapes_and_dtypes(tmp_path, config):
    source = _write_fp8_source(DeepSeekModel.random(config, seed=2), tmp_path / "source")
    save_checkpoint(load_checkpoint(source, keep_fp8=True), tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:  # the header, as written
        # a safe_open handle has keys() but is not iterable
        got = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}  # noqa: SIM118
    assert got == _v3_fp8_layout(config)


def test_v3_sized_fp8_names_and_scale_grids_match_the_published_index():
    """DeepSeek-V3's real shapes on the meta device (no memory): the names and grids its published FP8 index
    lists, e.g. kv_a_proj_with_mqa 576 x 7168 with a 5 x 56 scale grid (a partial last row block)."""
    from workbench.model.fp8 import install_fp8_weights
    from workbench.model.quant import FP8Format

    cfg = dataclasses.replace(PRESETS["deepseek-v3"], num_hidden_layers=4)  # layers 0-2 dense, 3 MoE, as in V3
    model = build_meta(cfg)
    fp8 = {}
    for name, p in model.named_parameters():
        if name.startswith(("layers.0.", "layers.3.")) and name.endswith(("proj.weight", "proj_with_mqa.weight",
                                                                           "_proj")):
            *lead, n, k = p.shape
            fp8[name] = (torch.empty(p.shape, dtype=torch.float8_e4m3fn, device="meta"),
                         torch.empty(*lead, math.ceil(n / 128), math.ceil(k / 128), device="meta"))
    install_fp8_weights(model, fp8, FP8Format())
    saved = {n: (tuple(t.shape), t.dtype) for n, t in hf_state_dict(model).items()}
    e4m3, f32 = torch.float8_e4m3fn, torch.float32
    published = {  # DeepSeek-V3 / R1 model.safetensors.index.json + shard headers
        "model.layers.0.self_attn.q_a_proj.weight": ((1536, 7168), e4m3),
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": ((12, 56), f32),
        "model.layers.0.self_attn.q_b_proj.weight_scale_inv": ((192, 12), f32),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), e4m3),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": ((5, 56), f32),
        "model.layers.0.self_attn.kv_b_proj.weight_scale_inv": ((256, 4), f32),
        "model.layers.0.self_attn.o_proj.weight_scale_inv": ((56, 128), f32),
        "model.layers.0.mlp.gate_proj.weight_scale_inv": ((144, 56), f32),
        "model.layers.0.mlp.down_proj.weight_scale_inv": ((56, 144), f32),
        "model.layers.3.mlp.experts.0.gate_proj.weight": ((2048, 7168), e4m3),
        "model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv": ((16, 56), f32),
        "model.layers.3.mlp.experts.255.down_proj.weight": ((7168, 2048), e4m3),
        "model.layers.3.mlp.experts.255.down_proj.weight_scale_inv": ((56, 16), f32),
        "model.layers.3.mlp.shared_experts.up_proj.weight_scale_inv": ((16, 56), f32),
        "model.layers.3.mlp.gate.e_score_correction_bias": ((256,), f32),
    }
    assert {n: saved.get(n) for n in published} == published
    assert not any(n.endswith("_proj_scale_inv") or ".experts.gate_proj" in n for n in saved)  # no stacked names
    assert sum(n.startswith("model.layers.3.mlp.experts.") for n in saved) == 256 * 3 * 2
    assert saved["model.layers.1.self_attn.o_proj.weight"] == ((7168, 16384), f32)  # layers 1-2 left high precision


@torch.no_grad()
@pytest.mark.parametrize("high_precision_layer", [None, 1], ids=["all-fp8", "layer1-attn-experts-high"])
def test_transformers_reads_our_fp8_checkpoint(tmp_path, high_precision_layer):
    """transformers (without a GPU it dequantizes FP8 checkpoints on load) gets the weights our loader gets, also
    when some linears were saved in high precision (listed in modules_to_not_convert)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    from workbench.model.fp8 import disable_fp8

    source = _write_fp8_source(DeepSeekModel.random(BLOCKS, seed=4), tmp_path / "source")
    kept = load_checkpoint(source, keep_fp8=True)
    if high_precision_layer is not None:
        disable_fp8(kept, layers=[high_precision_layer], sites=["attn", "experts"])
    save_checkpoint(kept, tmp_path / "saved")
    ours = load_checkpoint(tmp_path / "saved")  # dequantized by our loader
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    state = hf.state_dict()
    for L in (0, 1, 2):
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert torch.equal(state[f"model.layers.{L}.self_attn.{proj}.weight"],
                               getattr(ours.layers[L].self_attn, proj).weight), (L, proj)
    experts = ours.layers[1].mlp.experts  # transformers fuses gate and up in memory: [E, 2I, H]
    assert torch.equal(state["model.layers.1.mlp.experts.gate_up_proj"],
                       torch.cat([experts.gate_proj, experts.up_proj], dim=1))
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"], experts.down_proj)
    torch.testing.assert_close(hf(_ids(ours)).logits, ours(_ids(ours)), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_partly_dequantized_model_names_its_high_precision_linears(tmp_path, partial_source):
    from workbench.model.fp8 import disable_fp8

    kept = load_checkpoint(partial_source, keep_fp8=True)
    disable_fp8(kept, layers=[1], sites=["attn", "experts"])
    save_checkpoint(kept, tmp_path / "mixed")
    quant = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert quant == {**V3_QUANT, "modules_to_not_convert": [
        "model.layers.1.mlp.experts", "model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.1.self_attn.kv_b_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.q_b_proj"]}
    again = load_checkpoint(tmp_path / "mixed", keep_fp8=True)
    _assert_same_tensors(again.state_dict(), kept.state_dict())
    assert torch.equal(again(_ids(kept)), kept(_ids(kept)))
    # all of it dequantized: a plain checkpoint, with no quantization_config left to mislead a reader
    disable_fp8(kept)
    save_checkpoint(kept, tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert all(t.dtype == torch.float32 for t in _saved_tensors(tmp_path / "plain").values())


def test_fp8_save_with_a_dtype_converts_only_the_high_precision_tensors(tmp_path, partial_source):
    save_checkpoint(load_checkpoint(partial_source, keep_fp8=True), tmp_path, dtype=torch.bfloat16)
    source, saved = load_file(str(partial_source / "model.safetensors")), _saved_tensors(tmp_path)
    for name, t in saved.items():
        if source[name].dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            assert torch.equal(t, source[name]), name  # codes and scales untouched
        elif name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            assert t.dtype == torch.float32, name  # the router stays fp32, as DeepSeek keeps it
        else:
            assert t.dtype == torch.bfloat16, name


@torch.no_grad()
def test_ue8m0_scales_keep_their_format(tmp_path):
    from workbench.model.fp8_linear import FP8Linear

    source = _write_fp8_source(DeepSeekModel.random(PRESETS["tiny"], seed=6), tmp_path / "source", ue8m0=True)
    kept = load_checkpoint(source, keep_fp8=True)
    save_checkpoint(kept, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"] == {
        **V3_QUANT, "scale_fmt": "ue8m0"}
    again = load_checkpoint(tmp_path / "saved", keep_fp8=True)
    assert isinstance(again.layers[0].self_attn.o_proj, FP8Linear) and again.layers[0].self_attn.o_proj.fmt.ue8m0
    assert again.layers[1].mlp.experts.fp8 is not None and again.layers[1].mlp.experts.fp8.ue8m0
    _assert_same_tensors(_saved_tensors(tmp_path / "saved"), load_file(str(source / "model.safetensors")))
    assert torch.equal(again(_ids(kept)), kept(_ids(kept)))


# ------------------------------------------------------------------------------------------------ bad FP8 input
def test_fp8_save_refuses_a_scale_off_its_grid_and_writes_nothing(tmp_path, partial_source):
    kept = load_checkpoint(partial_source, keep_fp8=True)
    kept.layers[1].self_attn.o_proj.weight_scale_inv = torch.ones(1, 1)  # o_proj is 160 x 96: needs 2 x 1
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.o_proj.weight: torch.float8_e4m3fn "
                                              r"\(160, 96\) needs a float32 model.layers.1.self_attn.o_proj."
                                              r"weight_scale_inv of shape \(2, 1\).*holds torch.float32 \(1, 1\)"):
        save_checkpoint(kept, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_checkpoint(DeepSeekModel.random(PRESETS["tiny"], seed=0), tmp_path / "existing")
    before = {f.name: f.read_bytes() for f in (tmp_path / "existing").iterdir()}
    experts = kept.layers[2].mlp.experts
    kept.layers[1].self_attn.o_proj.weight_scale_inv = torch.ones(2, 1)
    experts.down_proj_scale_inv = experts.down_proj_scale_inv[:, :1]  # per expert [1, 2]; 160 x 136 needs [2, 2]
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.0.down_proj.weight: .* of shape \(2, 2\)"):
        save_checkpoint(kept, tmp_path / "existing")
    assert {f.name: f.read_bytes() for f in (tmp_path / "existing").iterdir()} == before  # nothing lost


def test_fp8_save_refuses_what_one_quantization_config_cannot_describe(tmp_path, partial_source):
    from workbench.model.quant import FP8Format

    kept = load_checkpoint(partial_source, keep_fp8=True)
    linear = kept.layers[0].self_attn.q_b_proj
    codes = linear.weight
    linear.weight = nn.Parameter(codes.float().to(torch.float8_e5m2), requires_grad=False)
    with pytest.raises(CheckpointError, match="FP8 weights in more than one format .*float8_e5m2: "
                                              "'model.layers.0.self_attn.q_b_proj.weight'"):
        save_checkpoint(kept, tmp_path / "out")
    linear.weight = codes
    linear.fmt = FP8Format("e4m3", ue8m0=True)
    with pytest.raises(CheckpointError, match="fp32 and with ue8m0"):
        save_checkpoint(kept, tmp_path / "out")
    linear.weight = nn.Parameter(codes.float())  # high precision, with the scale of the codes left behind
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_b_proj.weight_scale_inv: a scale without "
                                              r"an FP8 weight"):
        save_checkpoint(kept, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keep_fp8_load_names_a_scale_off_its_grid_or_missing(tmp_path, partial_source):
    tensors = load_file(str(partial_source / "model.safetensors"))
    cfg = (partial_source / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg)
    bad = dict(tensors)
    bad["model.layers.2.mlp.experts.4.up_proj.weight_scale_inv"] = torch.ones(1, 2)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.4.up_proj.weight: shape \(136, 160\), "
                                              r"scale \(1, 2\) \(expert 4\) do not fit"):
        load_checkpoint(tmp_path, keep_fp8=True)
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.experts.4.up_proj.weight.*does not tile"):
        load_checkpoint(tmp_path)
    del bad["model.layers.2.mlp.experts.4.up_proj.weight_scale_inv"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="experts.4.up_proj.weight is torch.float8_e4m3fn but .*_scale_inv is "
                                              "missing"):
        load_checkpoint(tmp_path, keep_fp8=True)


# ------------------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize(("name", "value"), [("model.layers.1.self_attn.o_proj.weight", math.nan),
                                             ("model.layers.1.mlp.gate.e_score_correction_bias", math.inf)])
def test_a_nan_or_inf_weight_is_refused_by_name(tmp_path, tiny, name, value):
    save_checkpoint(tiny, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    counts = "1 NaN and 0 inf" if math.isnan(value) else "0 NaN and 1 inf"
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {name} holds {counts} of \d+ values"):
        load_checkpoint(tmp_path)


def test_a_nan_fp8_code_or_scale_is_refused_dequantized_or_kept(tmp_path, partial_source):
    (tmp_path / "config.json").write_text((partial_source / "config.json").read_text())
    tensors = load_file(str(partial_source / "model.safetensors"))
    name = "model.layers.2.mlp.experts.4.up_proj.weight"
    for bad in (name, name + "_scale_inv"):
        broken = {n: t.clone() for n, t in tensors.items()}
        if bad == name:
            broken[bad].view(torch.uint8).view(-1)[5] = 0xFF  # e4m3fn's NaN code
        else:
            broken[bad].view(-1)[0] = math.nan
        save_file(broken, str(tmp_path / "model.safetensors"))
        for keep_fp8 in (False, True):
            shown = bad if keep_fp8 else name  # dequantized, the NaN scale shows in the weight it scales
            with pytest.raises(CheckpointError, match=rf"tensor {shown} holds \d+ NaN"):
                load_checkpoint(tmp_path, keep_fp8=keep_fp8)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_non_finite_fp8_code_is_caught_and_no_finite_one(fmt):
    from workbench.checkpoint.checks import check_finite as _check_finite

    codes = torch.arange(256, dtype=torch.uint8).view(fmt)  # every code of the format once
    finite = torch.isfinite(codes.float())
    _check_finite(codes[finite], "finite", Path("f.safetensors"))
    for code in torch.nonzero(~finite).flatten().tolist():
        with pytest.raises(CheckpointError, match="f.safetensors: tensor w holds"):
            _check_finite(torch.cat([codes[finite], codes[code:code + 1]]), "w", Path("f.safetensors"))


# ------------------------------------------------------------------------------------------------ index paths
def _write_index(path: Path, weight_map: object) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def sharded(tmp_path, tiny) -> Path:
    save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=60_000)
    return tmp_path / "ckpt"


def _point_one_shard_at(ckpt: Path, target: str) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    _write_index(ckpt, {n: target if f == first else f for n, f in index["weight_map"].items()})


def test_an_index_naming_files_outside_its_folder_is_refused(sharded):
    outside = sharded.parent / "other"
    outside.mkdir()
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    (outside / shard.name).write_bytes(shard.read_bytes())  # a loadable shard, but not this checkpoint's
    for target, message in ((f"../other/{shard.name}", "absolute paths and '..' are refused"),
                            (str(outside / shard.name), "absolute paths and '..' are refused"),
                            ("/etc/passwd", "absolute paths and '..' are refused")):
        _point_one_shard_at(sharded, target)
        with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: shard '{target}' .*{message}"):
            load_checkpoint(sharded)
    (sharded / "link.safetensors").symlink_to(outside / shard.name)  # inside by name, outside once resolved
    _point_one_shard_at(sharded, "link.safetensors")
    with pytest.raises(CheckpointError, match=r"shard 'link.safetensors' resolves to .*other.*, outside the checkpoint "
                                              r"folder"):
        load_checkpoint(sharded)


def test_a_symlink_inside_the_folder_still_loads(sharded, tiny):
    """Symlinks that stay inside the folder (as a shard renamed by a link) are fine."""
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    (sharded / "renamed.safetensors").symlink_to(shard.name)
    _point_one_shard_at(sharded, "renamed.safetensors")
    assert torch.equal(load_checkpoint(sharded)(_ids(tiny)), tiny(_ids(tiny)))


def _load_errors_in_a_subprocess(*paths: Path, timeout: float = 120.0) -> list[str]:
    """What `load_checkpoint` says for each path, run in a fresh interpreter: a loader that opens a FIFO blocks
    inside safetensors without releasing the GIL, so only a process can be timed out."""
    code = ("import sys\nfrom workbench.checkpoint import load_checkpoint\nfor p in sys.argv[1:]:\n"
            "    try:\n        load_checkpoint(p)\n        print('loaded')\n"
            "    except Exception as e:\n        print(type(e).__name__, e)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_checkpoint blocked for {timeout:g} s: it opened a FIFO")
    return done.stdout.splitlines()


def test_a_fifo_is_never_opened(sharded, tmp_path):
    os.mkfifo(sharded / "fifo.safetensors")
    _point_one_shard_at(sharded, "fifo.safetensors")
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((sharded / "config.json").read_text())
    os.mkfifo(single / "model.safetensors")
    by_index, alone = _load_errors_in_a_subprocess(sharded, single)
    assert by_index.startswith("CheckpointError") and "fifo.safetensors is not a regular file" in by_index
    assert alone.startswith("CheckpointError") and "model.safetensors is not a regular file" in alone


@pytest.mark.parametrize(("weight_map", "message"), [
    (["model-00001-of-00002.safetensors"], "'weight_map' must be an object of tensor name -> shard file name, got list"),
    ({"model.embed_tokens.weight": 3}, r"weight_map\['model.embed_tokens.weight'\] is 3, expected a shard file name"),
])
def test_a_malformed_weight_map_names_the_index(sharded, weight_map, message):
    _write_index(sharded, weight_map)
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: not a valid safetensors index: {message}"):
        load_checkpoint(sharded)


# ------------------------------------------------------------------------------------------------ digest
@pytest.fixture
def bundled_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the bundled checkpoint (file times kept, as `cp -p` keeps them) and a private user cache dir."""
    import shutil

    from workbench.loader import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model"))


def _scale_embeddings(path: Path, factor: float = 1.01) -> None:
    """A "fine-tune": every shape and config.json as they were, one tensor's values changed."""
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * factor
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def hash_calls(monkeypatch) -> list[Path]:
    """Every file `checkpoint_digest` streams through sha256."""
    from workbench.checkpoint import digest as checkpoint

    calls: list[Path] = []
    real = checkpoint._file_sha256
    monkeypatch.setattr(checkpoint, "_file_sha256", lambda p: calls.append(p) or real(p))
    return calls


def test_digest_changes_when_any_weight_changes(bundled_copy, tmp_path):
    import shutil

    original = checkpoint_digest(bundled_copy)
    tuned = Path(shutil.copytree(bundled_copy, tmp_path / "tuned"))
    _scale_embeddings(tuned)
    assert (tuned / "config.json").read_bytes() == (bundled_copy / "config.json").read_bytes()
    assert checkpoint_digest(tuned) != original
    assert checkpoint_digest(tuned / "model.safetensors") == checkpoint_digest(tuned)  # the file or its folder


def test_digest_is_cached_by_size_and_mtime(bundled_copy, hash_calls):
    weights = bundled_copy / "model.safetensors"
    first = checkpoint_digest(bundled_copy)
    assert hash_calls == [weights]
    cache = json.loads((bundled_copy / DIGEST_CACHE_NAME).read_text())
    st = weights.stat()
    assert cache["files"]["model.safetensors"]["size"] == st.st_size
    assert cache["files"]["model.safetensors"]["mtime_ns"] == st.st_mtime_ns
    assert checkpoint_digest(bundled_copy) == first and hash_calls == [weights]  # read from the cache
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert checkpoint_digest(bundled_copy) == first and hash_calls == [weights, weights]
    assert checkpoint_digest(bundled_copy) == first and len(hash_calls) == 2


def test_a_rewrite_in_the_same_timestamp_tick_is_not_mistaken_for_the_cached_file(bundled_copy, hash_calls):
    """A file changed just now is hashed but not cached: a same-size rewrite that keeps its mtime_ns (coarse file
    system clocks) must still change the digest."""
    weights = bundled_copy / "model.safetensors"
    _scale_embeddings(bundled_copy)
    st = weights.stat()
    before = checkpoint_digest(bundled_copy)
    _scale_embeddings(bundled_copy)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    assert checkpoint_digest(bundled_copy) != before and len(hash_calls) == 2


def test_digest_cache_falls_back_to_the_user_cache_and_never_fails(bundled_copy, tmp_path, monkeypatch, hash_calls):
    (bundled_copy / DIGEST_CACHE_NAME).mkdir()  # the file cannot be written beside the weights (even as root)
    first = checkpoint_digest(bundled_copy)
    [user] = digest_cache_paths(bundled_copy)[1:]
    assert user.is_relative_to(tmp_path / "user-cache" / "moe-workbench")
    assert json.loads(user.read_text())["path"] == str(bundled_copy.resolve())
    assert checkpoint_digest(bundled_copy) == first and len(hash_calls) == 1
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))  # no cache can be written anywhere
    assert checkpoint_digest(bundled_copy) == first == checkpoint_digest(bundled_copy)
    assert len(hash_calls) == 3
    assert not list(bundled_copy.glob("*.tmp")) and not list(tmp_path.glob("*.tmp"))


def test_the_bundled_model_is_cached_outside_the_package(tmp_path, monkeypatch):
    from workbench.loader import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert [p.parent for p in digest_cache_paths(DEFAULT_MODEL_DIR)] == [tmp_path / "moe-workbench" / "digests"]
    assert digest_cache_paths(tmp_path)[0] == tmp_path / DIGEST_CACHE_NAME


def test_a_hugging_face_hub_snapshot_still_loads(tmp_path, tiny):
    """The hub's cache links every file of `snapshots/<rev>/` to `../../blobs/<hash>`: outside the folder, but the
    layout the hub itself makes, so it is allowed (and nothing else outside is)."""
    save_checkpoint(tiny, tmp_path / "saved", max_shard_bytes=60_000)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "saved").iterdir())):
        f.rename(repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert torch.equal(load_checkpoint(snapshot)(_ids(tiny)), tiny(_ids(tiny)))
    assert checkpoint_digest(snapshot).startswith("sha256:")
