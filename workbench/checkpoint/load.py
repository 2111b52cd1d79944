"""`load_checkpoint`: build the model the config describes (through its family) and fill it tensor by tensor,
dequantizing FP8 blocks or keeping them; `build_meta` for shapes without memory."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.checkpoint.checks import check_finite, check_layers, check_shapes, loadable_tensors
from workbench.checkpoint.files import EXPERT_RE, FUSED_RE, LAYER_RE, CheckpointError, CheckpointReader, hf_to_ours, ours_to_hf
from workbench.config import ModelConfig
from workbench.model.fp8 import install_fp8_weights
from workbench.model.quant import FP8Format
from workbench.model.transformer import DeepSeekModel


def _iter_model_tensors(reader: CheckpointReader, skipped: list[str], keep_fp8: bool = False
                        ) -> Iterator[tuple[str, int | None, torch.Tensor, str]]:
    """Yield (our name, expert index or None, tensor, HF name); MTP layers go to `skipped`.

    With `keep_fp8`, linear weights (`*proj.weight`, experts) come as stored, FP8 codes undequantized. Every
    tensor is checked for NaN/inf as it is read. Layers past the MTP ones come through and are unexpected (only
    `strict=False` gets that far: `check_layers` refuses them first).
    """
    def read(hf_name: str, keep: bool) -> torch.Tensor:
        t = reader.raw(hf_name) if keep else reader.get(hf_name)
        check_finite(t, hf_name, reader.weight_map[hf_name])
        return t

    L, mtp = reader.config.num_hidden_layers, reader.config.num_nextn_predict_layers
    for hf_name in reader.names():
        if hf_name.endswith("_scale_inv"):
            continue
        ours = hf_to_ours(hf_name)
        m = LAYER_RE.match(ours)
        if m and L <= int(m.group(1)) < L + mtp:
            skipped.append(hf_name)
            continue
        e = EXPERT_RE.match(ours)
        if e:
            layer, expert, proj = e.groups()
            yield f"layers.{layer}.mlp.experts.{proj}", int(expert), read(hf_name, keep_fp8), hf_name
            continue
        yield ours, None, read(hf_name, keep_fp8 and ours.endswith(("proj.weight", "proj_with_mqa.weight"))), hf_name


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None,
                    strict: bool = True, progress: bool = False, keep_fp8: bool = False) -> DeepSeekModel:
    """Build the model the config describes and fill it from the checkpoint, checking every name and shape.

    `keep_fp8`: FP8 linear weights stay e4m3 codes + `weight_scale_inv` in `FP8Linear`s / FP8 `Experts` (see
    `workbench.model.fp8`), run in DeepSeek-V3's FP8 recipe, instead of being dequantized to `dtype`.
    The layer indices and shapes in the headers are checked against the config first (with `strict`, layers the
    config does not declare are refused; without, they are ignored like any unexpected tensor), and a tensor
    holding NaN or inf is refused by name.
    """
    reader = CheckpointReader.open(path, config)
    cfg = reader.config
    if keep_fp8 and reader.block != (128, 128):
        raise CheckpointError(f"{reader.path}: keep_fp8 needs 128x128 weight blocks, the checkpoint has {reader.block}")
    if strict:
        check_layers(reader)
    check_shapes(reader)
    fp8_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    params = loadable_tensors(model, cfg)
    values: dict[str, torch.Tensor] = {}
    expert_filled: dict[str, set[int]] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    tensors = _iter_model_tensors(reader, skipped, keep_fp8)
    for ours, expert, tensor, hf_name in tqdm(tensors, total=len(reader.names()), desc="loading", disable=not progress,
                                               unit="tensor"):
        fused = FUSED_RE.match(ours) if expert is None else None
        if fused:  # transformers' in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            layer, proj = fused.groups()
            if proj == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                _put(values, params, f"layers.{layer}.mlp.experts.gate_proj", gate, hf_name, dtype)
                _put(values, params, f"layers.{layer}.mlp.experts.up_proj", up, hf_name, dtype)
            else:
                _put(values, params, ours, tensor, hf_name, dtype)
            continue
        if ours not in params:
            unexpected.append(hf_name)
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # only with keep_fp8
            _put_fp8(fp8_values, params, ours, expert, tensor, reader, hf_name)
            if expert is not None:
                expert_filled.setdefault(ours, set()).add(expert)
            continue
        if expert is None:
            _put(values, params, ours, tensor, hf_name, dtype)
            continue
        full = params[ours]
        if ours not in values:
            values[ours] = torch.zeros(full.shape, dtype=dtype)
            expert_filled[ours] = set()
        if expert >= full.shape[0] or tuple(tensor.shape) != tuple(full.shape[1:]):
            raise CheckpointError(f"{hf_name}: shape {tuple(tensor.shape)} / expert {expert} does not fit "
                                  f"{ours} {tuple(full.shape)}; config.json does not match the weights")
        values[ours][expert] = tensor.to(dtype)
        expert_filled[ours].add(expert)
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    missing = [ours_to_hf(n) for n in params if n not in values and n not in fp8_values]
    for n, got in expert_filled.items():
        lost = sorted(set(range(params[n].shape[0])) - got)
        if lost:
            missing.append(f"{ours_to_hf(n)} experts {lost[:8]}{'...' if len(lost) > 8 else ''}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:6]}")
        raise CheckpointError(f"{reader.path}: tensors do not match config.json ({'; '.join(parts)})")
    if skipped:
        layers = sorted({int(LAYER_RE.match(hf_to_ours(s)).group(1)) for s in skipped})  # type: ignore[union-attr]
        warnings.warn(f"skipped {len(skipped)} tensors of multi-token-prediction layers {layers} "
                      "(not part of the main model)", stacklevel=2)
    model.load_state_dict(values, strict=False, assign=True)
    # buffers that were not in the file (V2's unused zero bias) and the RoPE tables must be real tensors
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=torch.float32),
                                       persistent=name in module.state_dict())
    model.rotary = type(model.rotary)(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if fp8_values:
        quant = dict(cfg.hf_extra).get("quantization_config") or {}
        fmt = "e5m2" if next(iter(fp8_values.values()))[0].dtype == torch.float8_e5m2 else "e4m3"
        install_fp8_weights(model, fp8_values, FP8Format(fmt, quant.get("scale_fmt") == "ue8m0"))
    return model.eval()


def _put_fp8(fp8_values: dict[str, tuple[torch.Tensor, torch.Tensor]], params: dict[str, torch.Tensor], ours: str,
             expert: int | None, q: torch.Tensor, reader: CheckpointReader, hf_name: str) -> None:
    """Keep an FP8 weight and its scale grid as stored (experts stacked: [E, N, K], [E, ceil(N/b), ceil(K/b)])."""
    if hf_name + "_scale_inv" not in reader.weight_map:
        raise CheckpointError(f"{hf_name} is {q.dtype} but {hf_name}_scale_inv is missing")
    scale = reader.raw(hf_name + "_scale_inv").float()
    check_finite(scale, hf_name + "_scale_inv", reader.weight_map[hf_name + "_scale_inv"])
    full = tuple(params[ours].shape)
    want = full if expert is None else full[1:]
    grid = (math.ceil(want[0] / 128), math.ceil(want[1] / 128))
    if tuple(q.shape) != want or tuple(scale.shape) != grid or (expert is not None and expert >= full[0]):
        raise CheckpointError(f"{hf_name}: shape {tuple(q.shape)}, scale {tuple(scale.shape)} (expert {expert}) "
                              f"do not fit {ours} {full} with {grid} scale blocks")
    if expert is None:
        fp8_values[ours] = (q, scale)
        return
    if ours not in fp8_values:
        fp8_values[ours] = (torch.zeros(full, dtype=q.dtype), torch.zeros(full[0], *grid))
    fp8_values[ours][0][expert] = q
    fp8_values[ours][1][expert] = scale


def _put(values: dict[str, torch.Tensor], params: dict[str, torch.Tensor], ours: str, tensor: torch.Tensor,
         hf_name: str, dtype: torch.dtype) -> None:
    if ours not in params:
        raise CheckpointError(f"{hf_name}: no such tensor in a model with this config")
    want = tuple(params[ours].shape)
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{hf_name}: shape {tuple(tensor.shape)}, the config implies {want}; "
                              "config.json does not match the weights")
    keep_fp32 = ours.endswith("e_score_correction_bias") or ours.endswith("mlp.gate.weight")
    values[ours] = tensor.to(torch.float32 if keep_fp32 else dtype)


def build_meta(config: ModelConfig) -> DeepSeekModel:
    """The model's full module tree on the meta device: V3's 671B shape with no memory allocated."""
    with torch.device("meta"):
        return DeepSeekModel(config)
