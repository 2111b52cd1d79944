"""`load_checkpoint`: build the model the config describes (through its family) and fill it tensor by tensor,
dequantizing FP8 blocks or keeping them; `build_meta` for shapes without memory."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.checkpoint.checks import check_finite, check_layers, check_shapes, loadable_tensors
from workbench.checkpoint.files import FP8_CODES, CheckpointError, CheckpointReader, CheckpointSource
from workbench.checkpoint.layouts import FUSED_RE, LAYER_RE, MTP_RE, kept_in_fp32, ours_to_stored
from workbench.config import ModelConfig
from workbench.model.fp8 import install_fp8_weights
from workbench.model.quant import FP8Format
from workbench.model.transformer import DeepSeekModel


def _iter_model_tensors(reader: CheckpointReader, skipped: list[str], unexpected: list[str],
                        keep: Callable[[str, int | None], bool] | None, source: CheckpointSource
                        ) -> Iterator[tuple[str, int | None, torch.Tensor, str]]:
    """Yield (our name, expert index or None, tensor, stored name); MTP tensors go to `skipped`, names no tensor
    of ours has to `unexpected`.

    `keep` (keep_fp8 only) says which FP8 weights stay as stored, codes undequantized: those whose module can run
    them (plain linears, stacked experts). Every other quantized weight is dequantized; with keep_fp8 its stored
    dtype and scale go into `source`, so a save can encode it back. Every tensor is checked for NaN/inf as it is
    read. Layers past the MTP ones come through and are unexpected (only `strict=False` gets that far:
    `check_layers` refuses them first).
    """
    L, mtp = reader.config.num_hidden_layers, reader.config.num_nextn_predict_layers
    for name in reader.names():
        stored = reader.ours(name)
        if stored is None:
            unexpected.append(name)
            continue
        if stored.scale:
            continue
        ours, expert = stored.ours, stored.expert
        m = LAYER_RE.match(ours)
        if MTP_RE.match(ours) or (m and L <= int(m.group(1)) < L + mtp):
            skipped.append(name)
            continue
        source.names[(ours, expert, False)] = name
        raw = reader.raw(name)
        if not reader.is_quantized(raw, name):
            check_finite(raw, name, reader.weight_map[name])
            if keep is not None:
                source.dtypes[(ours, expert, False)] = raw.dtype
            yield ours, expert, raw, name
            continue
        scale = reader.scale(name)  # raises, naming the scale, when it is missing or of a wrong dtype
        scale_name = reader.scale_of[name]
        source.names[(ours, expert, True)] = scale_name
        if keep is not None:
            check_finite(scale, scale_name, reader.weight_map[scale_name])
            source.dtypes[(ours, expert, False)], source.dtypes[(ours, expert, True)] = raw.dtype, scale.dtype
        if keep is not None and raw.dtype in FP8_CODES and keep(ours, expert):
            check_finite(raw, name, reader.weight_map[name])
            yield ours, expert, raw, name
            continue
        t = reader.dequantize(name, raw)
        check_finite(t, name, reader.weight_map[name])  # a NaN code or scale shows in the weight it scales
        if keep is not None:
            source.scales[(ours, expert, False)] = scale
        yield ours, expert, t, name


def _fp8_keepable(model: DeepSeekModel) -> Callable[[str, int | None], bool]:
    """Which FP8 weights a model can hold as codes: stacked experts, and linears that are `nn.Linear`s (FP8Linear
    replaces them); a module that uses its weight otherwise (V4's grouped o_a_proj) gets it dequantized."""
    def keep(ours: str, expert: int | None) -> bool:
        if expert is not None or FUSED_RE.match(ours):
            return expert is not None
        if not ours.endswith(("proj.weight", "proj_with_mqa.weight")):
            return False
        try:
            return isinstance(model.get_submodule(ours.removesuffix(".weight")), nn.Linear)
        except AttributeError:
            return False

    return keep


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None,
                    strict: bool = True, progress: bool = False, keep_fp8: bool = False) -> DeepSeekModel:
    """Build the model the config describes and fill it from the checkpoint (any layout, see
    `workbench.checkpoint.layouts`), checking every name and shape.

    `keep_fp8`: FP8 linear weights stay e4m3 codes + their scales (fp32 in the module; ue8m0 converts exactly) in
    `FP8Linear`s / FP8 `Experts` (see `workbench.model.fp8`), run in DeepSeek-V3's FP8 recipe, instead of being
    dequantized to `dtype`. Our modules run no FP4 codes, so FP4 experts (and FP8 weights of modules other than
    plain linears and experts, e.g. V4's grouped o_a_proj) are held dequantized, exact in fp32 and bf16; every
    stored name, dtype and those scales go into `model.checkpoint_source`, from which `save_checkpoint` writes the
    checkpoint back bit for bit.
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
    source = CheckpointSource(reader.layout)
    tensors = _iter_model_tensors(reader, skipped, unexpected, _fp8_keepable(model) if keep_fp8 else None, source)
    for ours, expert, tensor, stored_name in tqdm(tensors, total=len(reader.names()), desc="loading",
                                                  disable=not progress, unit="tensor"):
        fused = FUSED_RE.match(ours) if expert is None else None
        if fused:  # transformers' in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            layer, proj = fused.groups()
            if proj == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                _put(values, params, f"layers.{layer}.mlp.experts.gate_proj", gate, stored_name, dtype)
                _put(values, params, f"layers.{layer}.mlp.experts.up_proj", up, stored_name, dtype)
            else:
                _put(values, params, ours, tensor, stored_name, dtype)
            continue
        if ours not in params:
            unexpected.append(stored_name)
            continue
        if tensor.dtype in FP8_CODES:  # only with keep_fp8
            _put_fp8(fp8_values, params, ours, expert, tensor, reader, stored_name)
            if expert is not None:
                expert_filled.setdefault(ours, set()).add(expert)
            continue
        if expert is None:
            _put(values, params, ours, tensor, stored_name, dtype)
            continue
        full = params[ours]
        if ours not in values:
            values[ours] = torch.zeros(full.shape, dtype=dtype)
            expert_filled[ours] = set()
        if expert >= full.shape[0] or tuple(tensor.shape) != tuple(full.shape[1:]):
            raise CheckpointError(f"{stored_name}: shape {tuple(tensor.shape)} / expert {expert} does not fit "
                                  f"{ours} {tuple(full.shape)}; config.json does not match the weights")
        values[ours][expert] = tensor.to(dtype)
        expert_filled[ours].add(expert)
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    missing = [_stored(reader, n) for n in params if n not in values and n not in fp8_values]
    for n, got in expert_filled.items():
        lost = sorted(set(range(params[n].shape[0])) - got)
        if lost:
            missing.append(f"{_stored(reader, n)} experts {lost[:8]}{'...' if len(lost) > 8 else ''}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:6]}")
        raise CheckpointError(f"{reader.path}: tensors do not match config.json ({'; '.join(parts)})")
    if skipped:
        layers = sorted({reader.layer_index(s) if reader.layer_index(s) is not None else f"mtp.{s.split('.')[1]}"
                         for s in skipped}, key=str)
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
    model.checkpoint_source = source
    return model.eval()


def _stored(reader: CheckpointReader, ours: str, expert: int | None = None) -> str:
    """The name `ours` has in the reader's layout (our name itself where the layout has none)."""
    try:
        return ours_to_stored(ours, reader.layout, reader.config.is_v4, expert)
    except KeyError:
        return ours


def _put_fp8(fp8_values: dict[str, tuple[torch.Tensor, torch.Tensor]], params: dict[str, torch.Tensor], ours: str,
             expert: int | None, q: torch.Tensor, reader: CheckpointReader, stored_name: str) -> None:
    """Keep an FP8 weight and its scale grid as stored, the scale as fp32 (ue8m0 converts exactly; experts stacked:
    [E, N, K], [E, ceil(N/b), ceil(K/b)])."""
    scale = reader.scale(stored_name).float()
    full = tuple(params[ours].shape)
    want = full if expert is None else full[1:]
    grid = (math.ceil(want[0] / 128), math.ceil(want[1] / 128))
    if tuple(q.shape) != want or tuple(scale.shape) != grid or (expert is not None and expert >= full[0]):
        raise CheckpointError(f"{stored_name}: shape {tuple(q.shape)}, scale {tuple(scale.shape)} (expert {expert}) "
                              f"do not fit {ours} {full} with {grid} scale blocks")
    if expert is None:
        fp8_values[ours] = (q, scale)
        return
    if ours not in fp8_values:
        fp8_values[ours] = (torch.zeros(full, dtype=q.dtype), torch.zeros(full[0], *grid))
    fp8_values[ours][0][expert] = q
    fp8_values[ours][1][expert] = scale


def _put(values: dict[str, torch.Tensor], params: dict[str, torch.Tensor], ours: str, tensor: torch.Tensor,
         stored_name: str, dtype: torch.dtype) -> None:
    if ours not in params:
        raise CheckpointError(f"{stored_name}: no such tensor in a model with this config")
    want = tuple(params[ours].shape)
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{stored_name}: shape {tuple(tensor.shape)}, the config implies {want}; "
                              "config.json does not match the weights")
    if not tensor.is_floating_point():  # V4's tid2eid (int64 expert ids)
        if tensor.dtype != params[ours].dtype:
            raise CheckpointError(f"{stored_name}: {tensor.dtype}, the model holds {params[ours].dtype} here")
        values[ours] = tensor
        return
    value = tensor.to(torch.float32 if kept_in_fp32(ours) else dtype)
    if not params[ours].is_contiguous():  # a layout the module chose (the column-major lm_head): kept
        value = torch.empty_strided(want, params[ours].stride(), dtype=value.dtype).copy_(value)
    values[ours] = value


def build_meta(config: ModelConfig) -> DeepSeekModel:
    """The model's full module tree on the meta device: V3's 671B shape with no memory allocated."""
    with torch.device("meta"):
        return DeepSeekModel(config)
