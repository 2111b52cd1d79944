"""DeepSeek-V4 (and V3.2) checkpoints: the three V4 layouts (transformers' save_pretrained, DeepSeek's hub files,
transformers' in-memory names), FP8 e4m3 with ue8m0 scales and FP4 e2m1 experts, keep_fp8, the bit-exact save, and
every refusal naming its file and tensor.

Every reference comes from transformers 5.24 (fp32, eager): its save_pretrained files, and its own loading of the
files written here by hand in DeepSeek's hub layout (names from an explicit table in this file, independent of
`workbench.checkpoint.layouts`). Every parameter and buffer is randomized first (transformers zero-initialises
tid2eid, sinks, position biases and the balancing bias). The model is tiny but its linears are 128-multiples, so
the 128x128 FP8 blocks and the 32-value FP4 groups are real ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.checkpoint import (
    CheckpointError,
    CheckpointReader,
    checkpoint_digest,
    checkpoint_layout,
    load_checkpoint,
    save_checkpoint,
)
from workbench.checkpoint.layouts import LayoutError, detect_layout
from workbench.config import ModelConfig
from workbench.model.fp4 import quantize_fp4
from workbench.model.fp8_linear import FP8Linear

transformers = pytest.importorskip("transformers")

SEQ = 160  # > the HCA rate 128, so the heavily compressed layer has an entry for the last 33 queries
LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
TF_V4 = dict(vocab_size=96, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=3, layer_types=LAYERS,
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
             mlp_layer_types=["hash_moe", "moe", "moe"], num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
             q_lora_rank=128, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
             index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, swiglu_limit=1.0,
             max_position_embeddings=512)
FP8_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
             "weight_block_size": [128, 128]}
# DeepSeek's hub names from transformers' in-memory ones (minus `model.`), applied in order
HUB_RENAMES = [
    (r"^embed_tokens\.", "embed."), (r"^lm_head\.", "head."), (r"^hc_head\.hc_", "hc_head_"),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.", ".hc_attn_"), (r"\.ffn_hc\.", ".hc_ffn_"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."), (r"\.mlp\.", ".ffn."),
    (r"\.sinks$", ".attn_sink"), (r"\.q_a_proj\.", ".wq_a."), (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."), (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."),
    (r"\.position_bias$", ".ape"), (r"compressor\.kv_norm\.", "compressor.norm."), (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."), (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]
FP8_LEAVES = (".wq_a.weight", ".wq_b.weight", ".wkv.weight", ".wo_a.weight", ".wo_b.weight", "shared_experts.w1.weight",
              "shared_experts.w2.weight", "shared_experts.w3.weight")  # indexer.wq_b included by ".wq_b.weight"
BF16_LEAVES = ("embed.weight", "head.weight", "ffn.gate.weight", "compressor.wkv.weight", "compressor.wgate.weight",
               "weights_proj.weight", "q_norm.weight")  # as DeepSeek stores them; the rest (norms, mHC, sinks) fp32


# ---------------------------------------------------------------------------------------------- references
@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    saved = set(model.state_dict())  # not the RoPE tables (non-persistent buffers)
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if name not in saved:
            continue
        if name.endswith("tid2eid"):  # distinct experts per token
            E = model.config.n_routed_experts
            p.copy_(torch.stack([torch.randperm(E, generator=g)[: p.shape[1]] for _ in range(p.shape[0])]))
        elif not p.is_floating_point():
            continue
        elif re.search(r"(norm|layernorm)\.weight$|(hc_)?scale$", name):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif re.search(r"(base|sinks|position_bias|e_score_correction_bias)$", name):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tf_model():
    config = transformers.DeepseekV4Config(**TF_V4, attn_implementation="eager")
    return _randomize(transformers.DeepseekV4ForCausalLM(config), seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tf_logits(tf_model, ids):
    with torch.no_grad():
        return tf_model(ids).logits


def _hub_config(tf_model) -> dict:
    """config.json in DeepSeek's form: compress_ratios per layer (+ the MTP layer's), num_hash_layers, top-level
    rope keys, no transformers-only layer lists."""
    d = tf_model.config.to_dict()
    for key in ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor",
                "transformers_version", "dtype", "_name_or_path", "architectures"):
        d.pop(key, None)
    d.update(architectures=["DeepseekV4ForCausalLM"], compress_ratios=[0, 4, 128, 0], num_hash_layers=1,
             rope_theta=10000.0, compress_rope_theta=160000.0, rope_scaling=None, qk_rope_head_dim=8,
             num_nextn_predict_layers=1)
    return d


def _hub_tensors(tf_model) -> dict[str, torch.Tensor]:
    """transformers' state dict under DeepSeek's hub names, experts per expert (w1 | w3 = gate_up_proj's halves)."""
    out: dict[str, torch.Tensor] = {}
    inter = tf_model.config.moe_intermediate_size
    for name, t in tf_model.state_dict().items():
        name = name.removeprefix("model.")
        fused = re.match(r"^(layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if fused:
            for e in range(t.shape[0]):
                if fused.group(2) == "gate_up_proj":
                    out[f"{fused.group(1)}.ffn.experts.{e}.w1.weight"] = t[e, :inter].clone()
                    out[f"{fused.group(1)}.ffn.experts.{e}.w3.weight"] = t[e, inter:].clone()
                else:
                    out[f"{fused.group(1)}.ffn.experts.{e}.w2.weight"] = t[e].clone()
            continue
        for pattern, repl in HUB_RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = t.clone()
    return out


def _fp8_ue8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes + ue8m0 scales of 128x128 blocks (each the smallest power of two >= amax / 448)."""
    N, K = w.shape
    rows, cols = math.ceil(N / 128), math.ceil(K / 128)
    padded = torch.zeros(rows * 128, cols * 128)
    padded[:N, :K] = w
    amax = padded.view(rows, 128, cols, 128).abs().amax(dim=(1, 3)).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    full = s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return (w / full).to(torch.float8_e4m3fn), s.to(torch.float8_e8m0fnu)


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _quantized_hub(tf_model) -> dict[str, torch.Tensor]:
    """The hub tensors as DeepSeek ships V4: FP8 linears + `.scale` (ue8m0), FP4 experts (int8 + ue8m0 per 32),
    bf16 embeddings, head, router, compressors, indexer weights_proj and q_norm; everything else fp32."""
    out: dict[str, torch.Tensor] = {}
    for name, t in _hub_tensors(tf_model).items():
        stem = name.removesuffix(".weight")
        if re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", name):
            out[name], out[stem + ".scale"] = quantize_fp4(t)
        elif name.endswith(FP8_LEAVES):
            out[name], out[stem + ".scale"] = _fp8_ue8m0(t)
        elif name.endswith(BF16_LEAVES):
            out[name] = t.bfloat16()
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def hf_dir(tf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("v4_hf")
    tf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hub_dir(tf_model, tmp_path_factory):
    tensors = _hub_tensors(tf_model)
    tensors["mtp.0.norm.weight"] = torch.ones(TF_V4["hidden_size"])  # DeepSeek's MTP module: skipped
    return _write(tmp_path_factory.mktemp("v4_hub"), tensors, _hub_config(tf_model))


@pytest.fixture(scope="module")
def quant_dir(tf_model, tmp_path_factory):
    config = {**_hub_config(tf_model), "quantization_config": FP8_QUANT, "expert_dtype": "fp4"}
    return _write(tmp_path_factory.mktemp("v4_fp8_fp4"), _quantized_hub(tf_model), config)


@pytest.fixture(scope="module")
def quant_plain(quant_dir):
    """The FP8/FP4 hub checkpoint loaded dequantized (read-only in the tests)."""
    return load_checkpoint(quant_dir)


def _tf_load(path: Path):
    return transformers.DeepseekV4ForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                              dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _file_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def _stored(path: Path) -> dict[str, tuple[torch.dtype, str]]:
    """name -> (dtype, sha256 of the bytes) of every tensor in a checkpoint folder."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[name] = (t.dtype, hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------------- layouts
def test_layout_detection_is_explicit():
    v4 = ModelConfig.from_hf_dict(transformers.DeepseekV4Config(**TF_V4).to_dict())
    assert detect_layout(["layers.0.attn.wq_a.weight", "embed.weight", "head.weight"], v4) == "hub"
    assert detect_layout(["model.layers.0.attn.wq_a.weight", "model.embed_tokens.weight", "head.weight"], v4) == "hf"
    assert detect_layout(["model.layers.0.self_attn.q_a_proj.weight", "lm_head.weight"], v4) == "internal"
    assert detect_layout(["model.layers.0.self_attn.q_a_proj.weight"], ModelConfig()) == "hf"  # V2/V3/V3.2: one layout
    with pytest.raises(LayoutError, match=r"mix layouts: hub \(layers.0.attn.wq_a.weight\), hf \(model.layers.0.attn"):
        detect_layout(["layers.0.attn.wq_a.weight", "head.weight", "model.layers.0.attn.wkv.weight"], v4)
    with pytest.raises(LayoutError, match="no tensor name of a deepseek_v4 checkpoint"):
        detect_layout(["model.embed_tokens.weight"], v4)  # in two layouts, so it tells neither


def test_the_files_of_each_layout_are_told_apart(hf_dir, hub_dir, quant_dir, tmp_path):
    assert checkpoint_layout(hf_dir) == "hf" and checkpoint_layout(hub_dir) == "hub"
    assert checkpoint_layout(quant_dir) == "hub"
    tensors = load_file(str(hub_dir / "model.safetensors"))
    tensors["model.layers.0.attn.wkv.weight"] = tensors.pop("layers.0.attn.wkv.weight")
    _write(tmp_path, tensors, json.loads((hub_dir / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"mix layouts: hub \(.*\), hf \(model.layers.0.attn.wkv.weight\)"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- loading
def test_transformers_save_pretrained_loads_to_the_same_logits(hf_dir, tf_model, ids, tf_logits):
    assert "model.layers.0.attn.norm.weight" in safe_open(str(hf_dir / "model.safetensors"), "pt").keys()  # noqa: SIM118
    ours = load_checkpoint(hf_dir)
    tf_state = tf_model.state_dict()
    ours_state = ours.state_dict()
    inter = TF_V4["moe_intermediate_size"]
    for name, t in tf_state.items():
        mine = name.removeprefix("model.")
        if mine.endswith("gate_up_proj"):
            assert torch.equal(ours_state[mine.replace("gate_up_proj", "gate_proj")], t[:, :inter]), name
            assert torch.equal(ours_state[mine.replace("gate_up_proj", "up_proj")], t[:, inter:]), name
        else:
            assert torch.equal(ours_state[mine], t), name
    # fp32, same weights: only the order of float operations differs (|logit| ~ 1-10)
    torch.testing.assert_close(_logits(ours, ids), tf_logits, atol=1e-5, rtol=1e-5)


def test_hub_layout_loads_in_transformers_and_ours_alike(hub_dir, ids, tf_logits):
    with pytest.warns(UserWarning, match=r"skipped 1 tensors of multi-token-prediction layers \['mtp.0'\]"):
        ours = load_checkpoint(hub_dir)
    torch.testing.assert_close(_logits(_tf_load(hub_dir), ids), tf_logits, atol=0, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), tf_logits, atol=1e-5, rtol=1e-5)
    # the released files' kv_norm spelling and transformers' save spelling both read as self_attn.kv_norm
    reader = CheckpointReader.open(hub_dir)
    assert reader.ours("layers.1.attn.kv_norm.weight").ours == "layers.1.self_attn.kv_norm.weight"
    assert reader.ours("layers.1.attn.compressor.norm.weight").ours == "layers.1.self_attn.compressor.kv_norm.weight"
    assert reader.layer_names(0) and all(reader.ours(n).ours.startswith("layers.0.") for n in reader.layer_names(0))


@torch.no_grad()
def test_a_bf16_load_keeps_what_transformers_keeps_in_fp32(hub_dir, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MTP skipped
        model = load_checkpoint(hub_dir, dtype=torch.bfloat16)
    layer = model.layers[1]
    assert layer.self_attn.q_a_proj.weight.dtype == torch.bfloat16
    for t in (layer.attn_hc.fn, layer.ffn_hc.scale, model.hc_head.hc_base, layer.self_attn.sinks,
              layer.self_attn.compressor.position_bias, layer.mlp.gate.weight, layer.mlp.gate.e_score_correction_bias):
        assert t.dtype == torch.float32
    assert torch.isfinite(model(ids)).all()
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16 and saved["layers.1.hc_attn_fn"].dtype == torch.float32


def test_transformers_in_memory_names_load_too(tf_model, tmp_path, ids, tf_logits):
    state = {n: t.contiguous() for n, t in tf_model.state_dict().items()}  # fused gate_up_proj [E, 2I, D]
    tf_model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_layout(tmp_path) == "internal"
    torch.testing.assert_close(_logits(load_checkpoint(tmp_path), ids), tf_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- FP8 / FP4
def test_fp8_and_fp4_hub_checkpoint_dequantizes_as_transformers_does(quant_dir, quant_plain, ids):
    ours = quant_plain
    tf = _tf_load(quant_dir)
    source = load_file(str(quant_dir / "model.safetensors"))
    # the dequantized weights are the blockwise products, exactly, in both loaders
    w = source["layers.1.attn.wq_b.weight"].float() * source["layers.1.attn.wq_b.scale"].float().repeat_interleave(
        128, 0).repeat_interleave(128, 1)[:, :128]
    assert torch.equal(ours.layers[1].self_attn.q_b_proj.weight, w)
    assert torch.equal(tf.state_dict()["model.layers.1.self_attn.q_b_proj.weight"], w)
    experts = ours.layers[2].mlp.experts
    tf_gate_up = tf.state_dict()["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(torch.cat([experts.gate_proj, experts.up_proj], dim=1), tf_gate_up)
    assert torch.equal(ours.layers[0].mlp.gate.tid2eid, source["layers.0.ffn.gate.tid2eid"])
    layer = CheckpointReader.open(quant_dir).layer(2)  # one layer, dequantized, by stored name, scales folded in
    assert not any(n.endswith(".scale") for n in layer)
    assert torch.equal(layer["layers.2.ffn.experts.3.w1.weight"], experts.gate_proj[3])
    torch.testing.assert_close(_logits(ours, ids), _logits(tf, ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_fp8_holds_codes_and_saves_the_files_it_read_bit_for_bit(quant_dir, quant_plain, tmp_path, ids):
    plain = quant_plain
    kept = load_checkpoint(quant_dir, keep_fp8=True)
    source = load_file(str(quant_dir / "model.safetensors"))
    q_a = kept.layers[1].self_attn.q_a_proj
    assert isinstance(q_a, FP8Linear) and q_a.fmt.ue8m0 and q_a.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(q_a.weight.view(torch.uint8), source["layers.1.attn.wq_a.weight"].view(torch.uint8))
    assert torch.equal(q_a.dense_weight(), plain.layers[1].self_attn.q_a_proj.weight)
    # FP4 experts and the grouped o_a_proj are held dequantized (our Experts and o_a_proj run no FP4/FP8 codes)
    assert kept.layers[2].mlp.experts.gate_proj.dtype == torch.float32
    assert torch.equal(kept.layers[2].mlp.experts.down_proj, plain.layers[2].mlp.experts.down_proj)
    assert torch.isfinite(kept(ids)).all()
    save_checkpoint(kept, tmp_path / "saved")
    assert _file_hashes(tmp_path / "saved") == _file_hashes(quant_dir)  # same names, dtypes, bytes, order
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads(
        (quant_dir / "config.json").read_text())
    save_checkpoint(kept, tmp_path / "sharded", max_shard_bytes=200_000)
    assert _stored(tmp_path / "sharded") == _stored(quant_dir)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    again = load_checkpoint(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values(), strict=True))
    assert checkpoint_digest(tmp_path / "saved") == checkpoint_digest(quant_dir)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["hf", "hub"])
def test_each_layout_saves_back_as_it_was_read(request, tmp_path, layout):
    source = request.getfixturevalue(f"{layout}_dir")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hub checkpoint's MTP tensors are skipped, with a warning
        kept = load_checkpoint(source, keep_fp8=True)
    save_checkpoint(kept, tmp_path)
    want = {n: v for n, v in _stored(source).items() if not n.startswith("mtp.")}  # MTP is not part of the model
    assert _stored(tmp_path) == want
    assert checkpoint_layout(tmp_path) == layout
    if layout == "hf":  # transformers' own file, byte for byte (same tensors, order and metadata)
        assert _file_hashes(tmp_path) == _file_hashes(source)


@torch.no_grad()
def test_a_layout_can_be_converted_on_save(quant_dir, quant_plain, tmp_path, ids):
    plain = quant_plain
    save_checkpoint(plain, tmp_path / "hf", layout="hf")
    assert checkpoint_layout(tmp_path / "hf") == "hf"
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in written and "expert_dtype" not in written  # all high precision now
    torch.testing.assert_close(_logits(_tf_load(tmp_path / "hf"), ids), _logits(plain, ids), atol=1e-5, rtol=1e-5)
    kept = load_checkpoint(quant_dir, keep_fp8=True)
    save_checkpoint(kept, tmp_path / "hf_fp8", layout="hf")  # FP8 and FP4 kept, under transformers' names
    names = _stored(tmp_path / "hf_fp8")
    assert names["model.layers.1.attn.wq_a.weight"][0] == torch.float8_e4m3fn
    assert names["model.layers.1.attn.wq_a.weight_scale_inv"][0] == torch.float8_e8m0fnu
    assert names["model.layers.2.ffn.experts.3.w2.weight"][0] == torch.int8
    again = load_checkpoint(tmp_path / "hf_fp8")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values(), strict=True))
    torch.testing.assert_close(_logits(_tf_load(tmp_path / "hf_fp8"), ids), _logits(plain, ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("form", ["hf", "hub"])
def test_a_model_read_from_no_checkpoint_is_written_in_its_config_form(tf_model, tmp_path, ids, form):
    from workbench.model.transformer import DeepSeekModel

    d = tf_model.config.to_dict() if form == "hf" else _hub_config(tf_model)
    model = DeepSeekModel.random(ModelConfig.from_hf_dict(d), seed=3)
    save_checkpoint(model, tmp_path)
    assert checkpoint_layout(tmp_path) == form
    torch.testing.assert_close(_logits(_tf_load(tmp_path), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_a_changed_fp4_expert_is_refused_not_rounded(quant_dir, tmp_path):
    kept = load_checkpoint(quant_dir, keep_fp8=True)
    with torch.no_grad():
        kept.layers[1].mlp.experts.up_proj[5, 0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=r"layers.1.ffn.experts.5.w3.weight: the weight no longer lies on the "
                                              r"torch.int8 grid of its stored scale layers.1.ffn.experts.5.w3.scale"):
        save_checkpoint(kept, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    kept.checkpoint_source = None  # the documented way out: high precision
    save_checkpoint(kept, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["layers.1.ffn.experts.5.w3.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- refusals
def _broken(quant_dir: Path, tmp_path: Path, edit) -> Path:
    tensors = load_file(str(quant_dir / "model.safetensors"))
    edit(tensors)
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    return _write(tmp_path / "broken", tensors, json.loads((quant_dir / "config.json").read_text()))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.__setitem__("layers.1.attn.wkv.weight", t["layers.1.attn.wkv.weight"][:16]),
     r"model.safetensors: layers.1.attn.wkv.weight: shape \(16, 128\), the config implies \(32, 128\)"),
    (lambda t: t.__setitem__("layers.1.ffn.experts.2.w1.weight", t["layers.1.ffn.experts.2.w1.weight"][:, :32]),
     r"model.safetensors: layers.1.ffn.experts.2.w1.weight: shape \(128, 32\), the config implies \(128, 64\)"),
    (lambda t: t.__setitem__("layers.1.attn.wq_a.scale", t["layers.1.attn.wq_a.scale"].float().bfloat16()),
     r"model.safetensors: scale layers.1.attn.wq_a.scale is torch.bfloat16; FP8/FP4 scales are float32 or"),
    (lambda t: t.pop("layers.2.attn.wo_b.scale"),
     r"model.safetensors: layers.2.attn.wo_b.weight is torch.float8_e4m3fn but layers.2.attn.wo_b.scale is missing"),
    (lambda t: t.pop("layers.0.ffn.experts.7.w2.scale"),
     r"layers.0.ffn.experts.7.w2.weight is int8 \(packed FP4\) but layers.0.ffn.experts.7.w2.scale is missing"),
    (lambda t: t.__setitem__("layers.0.ffn.experts.7.w2.scale", t["layers.0.ffn.experts.7.w2.scale"][:, :2]),
     r"layers.0.ffn.experts.7.w2.weight: packed FP4 \(128, 64\) with scale layers.0.ffn.experts.7.w2.scale \(128, 2\)"),
    (lambda t: t["layers.1.ffn.experts.0.w1.scale"].view(torch.uint8).view(-1).__setitem__(3, 0xFF),
     r"tensor layers.1.ffn.experts.0.w1.weight holds 32 NaN"),  # the NaN scale shows in the 32 values it scales
    (lambda t: t["layers.1.attn.wq_b.weight"].view(torch.uint8).view(-1).__setitem__(7, 0x7F),
     r"tensor layers.1.attn.wq_b.weight holds 1 NaN"),  # e4m3's NaN code
    (lambda t: t.__setitem__("layers.0.attn.bogus.weight", torch.zeros(2)),
     r"unexpected 1: \['layers.0.attn.bogus.weight'\]"),
    (lambda t: t.__setitem__("mtp.1.norm.weight", torch.zeros(2)),
     r"declares 3 layers \(\+ 1 multi-token-prediction\) but the weights hold multi-token-prediction module mtp.1"),
], ids=["shape", "fp4-shape", "scale-dtype", "fp8-scale-missing", "fp4-scale-missing", "fp4-scale-shape",
        "nan-ue8m0-scale", "nan-fp8-code", "unexpected", "mtp-beyond"])
def test_bad_input_is_refused_naming_file_and_tensor(quant_dir, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_broken(quant_dir, tmp_path, edit))


def test_a_nan_ue8m0_scale_is_named_when_kept(quant_dir, tmp_path):
    def edit(t):
        t["layers.1.attn.wq_a.scale"].view(torch.uint8).view(-1)[0] = 0xFF
    with pytest.raises(CheckpointError, match=r"tensor layers.1.attn.wq_a.scale holds 1 NaN and 0 inf"):
        load_checkpoint(_broken(quant_dir, tmp_path, edit), keep_fp8=True)


def test_a_missing_tensor_is_named_in_the_files_layout(hub_dir, tmp_path):
    tensors = load_file(str(hub_dir / "model.safetensors"))
    del tensors["layers.2.attn.compressor.ape"]
    with pytest.raises(CheckpointError, match=r"missing 1: \['layers.2.attn.compressor.ape'\]"):
        load_checkpoint(_write(tmp_path, tensors, json.loads((hub_dir / "config.json").read_text())))


# ---------------------------------------------------------------------------------------------- V3.2
def test_v32_save_pretrained_needs_no_new_names(tmp_path):
    config = transformers.DeepseekV32Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        index_n_heads=16, index_head_dim=16, index_topk=6, attn_implementation="eager")
    tf = _randomize(transformers.DeepseekV32ForCausalLM(config), seed=2).eval()
    tf.save_pretrained(tmp_path)
    reader = CheckpointReader.open(tmp_path)
    assert reader.layout == "hf" and all(reader.ours(n) is not None for n in reader.names())
    ours = load_checkpoint(tmp_path)
    assert torch.equal(ours.layers[1].self_attn.indexer.k_norm.bias, tf.model.layers[1].self_attn.indexer.k_norm.bias)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), tf(ids).logits, atol=1e-5, rtol=1e-5)
