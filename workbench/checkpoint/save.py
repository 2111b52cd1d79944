"""`save_checkpoint`: the model back to safetensors (per-expert names, sharded) in a checkpoint layout, FP8 weights
kept in DeepSeek's layout with their `quantization_config`, and a model read with `keep_fp8` written back as the
files it came from.

A model read with `keep_fp8=True` carries a `CheckpointSource` (`model.checkpoint_source`): its layout, every stored
name, dtype and the scales of the quantized weights it holds dequantized (V4's FP4 experts; FP8 weights of modules
that cannot run FP8 codes). Saved again, each tensor goes back under its stored name in its stored dtype, FP8 codes
and scales as they are, and the dequantized ones encoded back with their stored scales, after checking that this
reproduces the held values exactly (a weight changed since it was read is refused, never rounded quietly).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench.checkpoint.files import (
    FP4_PACKED,
    INDEX_NAME,
    SCALE_DTYPES,
    SINGLE_NAME,
    CheckpointError,
    CheckpointSource,
    SourceKey,
)
from workbench.checkpoint.layouts import CheckpointLayout, kept_in_fp32, ours_to_stored, scale_name
from workbench.config import ModelConfig
from workbench.model.experts import Experts
from workbench.model.fp4 import FP4_BLOCK, dequantize_fp4, e2m1_codes, pack_fp4
from workbench.model.fp8_linear import FP8Linear
from workbench.model.quant import fp32_to_ue8m0
from workbench.model.transformer import DeepSeekModel

_STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")
_FP8_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
FP8_BLOCK = (128, 128)  # the only weight block keep_fp8 models hold (load_checkpoint refuses others)


def default_layout(config: ModelConfig) -> CheckpointLayout:
    """The layout a model without a source is written in: V4 in DeepSeek's hub layout when its config.json is in
    DeepSeek's form, else in transformers' (the form transformers' own save_pretrained pairs with it)."""
    return "hub" if config.is_v4 and config.config_form == "hub" else "hf"


def hf_state_dict(model: DeepSeekModel, layout: CheckpointLayout | None = None) -> dict[str, torch.Tensor]:
    """Our tensors as a checkpoint stores them: stored names of `layout` (default: the layout the model was read
    from, else `default_layout`), routed experts split per expert, FP8 codes with their scales; a model read with
    `keep_fp8` in its stored dtypes and formats (see the module docstring)."""
    entries, pairs = _stored_entries(model, layout)
    _check_quantized_pairs(entries, pairs)
    return {name: t for name, (_, t) in entries.items()}


def _source(model: DeepSeekModel) -> CheckpointSource | None:
    src = model.checkpoint_source
    return src if isinstance(src, CheckpointSource) else None


def _held_tensors(model: DeepSeekModel) -> list[tuple[SourceKey, torch.Tensor]]:
    """Every tensor the model saves, keyed (our name, expert, is a scale): stacked experts split per expert, FP8
    scales ([E, ...] stacked ones too) next to their weights."""
    out: list[tuple[SourceKey, torch.Tensor]] = []
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj, is_scale = stacked.groups()
            out.extend(((f"{prefix}.{proj}", e, bool(is_scale)), t[e].contiguous()) for e in range(t.shape[0]))
        elif name.endswith(".weight_scale_inv"):  # an FP8Linear's
            out.append(((name.removesuffix("_scale_inv"), None, True), t.contiguous()))
        else:
            out.append(((name, None, False), t.contiguous()))
    return out


def _stored_entries(model: DeepSeekModel, layout: CheckpointLayout | None, dtype: torch.dtype | None = None
                    ) -> tuple[dict[str, tuple[SourceKey, torch.Tensor]], dict[str, str]]:
    """(stored name -> (key, tensor as written), weight stored name -> scale stored name)."""
    src = _source(model)
    layout = layout or (src.layout if src is not None else default_layout(model.config))
    names = src.names if src is not None and src.layout == layout else {}
    is_v4 = model.config.is_v4

    def stored(key: SourceKey) -> str:
        if key in names:
            return names[key]
        ours, expert, is_scale = key
        try:
            weight = ours_to_stored(ours, layout, is_v4, expert)
        except KeyError as e:
            raise CheckpointError(f"{ours}: the {layout} layout has no name for it ({e})") from None
        return scale_name(weight, layout) if is_scale else weight

    held = _held_tensors(model)
    if src is not None:
        held = _encode_dequantized(held, src, stored)
    entries: dict[str, tuple[SourceKey, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    for key, t in held:
        name = stored(key)
        entries[name] = (key, _as_stored(key, t, src, dtype, name))
        if key[2]:
            pairs[stored((key[0], key[1], False))] = name
    return entries, pairs


def _encode_dequantized(held: list[tuple[SourceKey, torch.Tensor]], src: CheckpointSource,
                        stored: Callable[[SourceKey], str]) -> list[tuple[SourceKey, torch.Tensor]]:
    """Quantized weights the model holds dequantized, encoded back with their stored scales (which follow them)."""
    out: list[tuple[SourceKey, torch.Tensor]] = []
    for key, t in held:
        scale = src.scales.get(key)
        code_dtype = src.dtypes.get(key)
        if scale is None or code_dtype is None or not t.is_floating_point() or t.dtype in _FP8_FORMATS:
            out.append((key, t))
            continue
        w = t.detach().float().cpu()
        if code_dtype == FP4_PACKED:
            s = scale.float()
            codes = pack_fp4(e2m1_codes(w.unflatten(-1, (-1, FP4_BLOCK)) / s[..., None]).flatten(-2))
            back = dequantize_fp4(codes, scale, FP4_BLOCK)
        else:
            full = scale.float().repeat_interleave(FP8_BLOCK[0], 0)[: w.shape[0]].repeat_interleave(FP8_BLOCK[1], 1)
            codes = (w / full[:, : w.shape[1]]).to(code_dtype)
            back = codes.float() * full[:, : w.shape[1]]
        if not torch.equal(back, w):
            raise CheckpointError(f"{stored(key)}: the weight no longer lies on the {code_dtype} grid of its stored "
                                  f"scale {stored((key[0], key[1], True))} (changed since it was read?); set "
                                  "model.checkpoint_source = None to save it in high precision instead")
        out += [(key, codes), ((key[0], key[1], True), scale)]
    return out


def _as_stored(key: SourceKey, t: torch.Tensor, src: CheckpointSource | None, dtype: torch.dtype | None,
               name: str) -> torch.Tensor:
    """`t` in the dtype it is written in: its stored one (a keep_fp8 source; fp32 scales back to ue8m0 exactly),
    else `dtype` for high-precision tensors but the router, else as held."""
    if t.dtype in _FP8_FORMATS or t.dtype == FP4_PACKED or not t.is_floating_point():
        return t
    want = src.dtypes.get(key) if src is not None and dtype is None else None
    if key[2]:  # a scale
        if want == torch.float8_e8m0fnu and t.dtype != want:
            try:
                return fp32_to_ue8m0(t)
            except ValueError as e:
                raise CheckpointError(f"{name}: stored as ue8m0 but {e}") from None
        return t
    if want is not None and want.is_floating_point and want not in _FP8_FORMATS:  # not a weight dequantized since
        return t.to(want)
    if dtype is not None and not kept_in_fp32(key[0]):
        return t.to(dtype)
    return t


def _check_quantized_pairs(entries: dict[str, tuple[SourceKey, torch.Tensor]], pairs: dict[str, str]) -> None:
    """Every FP8 weight has a scale on its 128x128 grid (float32 as the model holds it, or ue8m0 as written), every
    packed FP4 weight one per group, every scale a quantized weight, and all FP8 weights share one format, so the
    written checkpoint loads again."""
    tensors = {name: t for name, (_, t) in entries.items()}
    dtypes = {t.dtype for t in tensors.values() if t.dtype in _FP8_FORMATS}
    if len(dtypes) > 1:
        by_dtype = {d: next(n for n, t in tensors.items() if t.dtype == d) for d in dtypes}
        raise CheckpointError(f"FP8 weights in more than one format cannot share one quantization_config: {by_dtype}")
    for weight, scale_of in pairs.items():
        w = tensors.get(weight)
        if w is None or (w.dtype not in _FP8_FORMATS and w.dtype != FP4_PACKED):
            raise CheckpointError(f"{scale_of}: a scale without an FP8 weight {weight}")
    for name, t in tensors.items():
        if t.dtype == FP4_PACKED and name in pairs:
            group = tensors[pairs[name]]
            want = (*t.shape[:-1], 2 * t.shape[-1] // FP4_BLOCK)
            if group.dtype not in SCALE_DTYPES or tuple(group.shape) != want:
                raise CheckpointError(f"{name}: packed FP4 {tuple(t.shape)} needs a float32 or ue8m0 scale of shape "
                                      f"{want} (one per {FP4_BLOCK} values), the model holds {group.dtype} "
                                      f"{tuple(group.shape)}")
            continue
        if t.dtype not in _FP8_FORMATS:
            continue
        s = tensors.get(pairs.get(name, ""))
        grid = (math.ceil(t.shape[0] / FP8_BLOCK[0]), math.ceil(t.shape[1] / FP8_BLOCK[1]))
        want_scale = pairs.get(name, name + "_scale_inv")
        if s is None or s.dtype not in SCALE_DTYPES or tuple(s.shape) != grid:
            got = "missing" if s is None else f"{s.dtype} {tuple(s.shape)}"
            raise CheckpointError(f"{name}: {t.dtype} {tuple(t.shape)} needs a float32 {want_scale} of shape "
                                  f"{grid} (128x128 blocks), the model holds {got}")


def _scales_are_ue8m0(model: DeepSeekModel) -> bool | None:
    """Whether the model's kept FP8 weights have power-of-two scales (V3.1's `scale_fmt: ue8m0`); None: none kept."""
    formats = {m.fmt.ue8m0 for m in model.modules() if isinstance(m, FP8Linear) and m.weight_scale_inv is not None}
    formats |= {m.fp8.ue8m0 for m in model.modules()
                if isinstance(m, Experts) and m.gate_proj_scale_inv is not None and m.fp8 is not None}
    if len(formats) > 1:
        raise CheckpointError("FP8 weights with fp32 and with ue8m0 (power-of-two) scales cannot share one "
                              "quantization_config")
    return next(iter(formats)) if formats else None


def _high_precision_linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    """HF module names of linear sites written in high precision next to FP8 ones (transformers'
    `modules_to_not_convert`); routed experts as one module, as transformers holds them."""
    names: set[str] = set()
    for name, t in tensors.items():
        if t.dtype in _FP8_FORMATS or t.dim() != 2 or not name.endswith(("proj.weight", "proj_with_mqa.weight")):
            continue
        module = name.removesuffix(".weight")
        expert = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.", module)
        names.add(expert.group(1) if expert else module)
    return sorted(names)


def fp8_quantization_config(fmt: str, ue8m0: bool, not_converted: list[str],
                            base: dict[str, object] | None = None) -> dict[str, object]:
    """DeepSeek-V3's `quantization_config` for block-FP8 weights (V3.1 adds `scale_fmt: ue8m0`); keys of `base`
    (the loaded checkpoint's) that say nothing about the weights are kept."""
    out = {k: v for k, v in (base or {}).items() if k not in ("scale_fmt", "modules_to_not_convert")}
    out.update(quant_method="fp8", fmt=fmt, weight_block_size=list(FP8_BLOCK), activation_scheme="dynamic")
    if ue8m0:
        out["scale_fmt"] = "ue8m0"
    if not_converted:
        out["modules_to_not_convert"] = not_converted
    return out


def _config_json(model: DeepSeekModel, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """config.json: the model's config, with a `quantization_config` that says what the files hold (none for all
    high precision) and, for V4, `expert_dtype: fp4` exactly when packed FP4 experts are written."""
    cfg = model.config.to_hf_dict()
    cfg.setdefault("architectures", [model.config.architecture])
    base = cfg.pop("quantization_config", None)
    base = dict(base) if isinstance(base, dict) else None
    fp8 = {t.dtype for t in tensors.values() if t.dtype in _FP8_FORMATS}
    fp4 = any(t.dtype == FP4_PACKED for t in tensors.values())
    if not fp4:
        cfg.pop("expert_dtype", None)
        if base is not None:
            base.pop("expert_dtype", None)
    if not fp8 and not fp4:
        return cfg
    ue8m0 = _scales_are_ue8m0(model)
    if ue8m0 is None:  # nothing kept as FP8 codes in a module: the format the scales were stored in
        ue8m0 = any(t.dtype == torch.float8_e8m0fnu for t in tensors.values()) or (base or {}).get("scale_fmt") == "ue8m0"
    fmt = _FP8_FORMATS[next(iter(fp8))] if fp8 else str((base or {}).get("fmt", "e4m3"))
    if model.config.is_v4:
        not_converted = list((base or {}).get("modules_to_not_convert") or [])
    else:
        not_converted = _high_precision_linears(tensors)
    quant = fp8_quantization_config(fmt, ue8m0, not_converted, base)
    if fp4 and "expert_dtype" not in cfg:
        quant["expert_dtype"] = "fp4"
    cfg["quantization_config"] = quant
    return cfg


def save_checkpoint(model: DeepSeekModel, path: str | Path, *, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None, layout: CheckpointLayout | None = None) -> Path:
    """Write config.json + model.safetensors, or shards + model.safetensors.index.json when over max_shard_bytes.

    `layout`: the names to write ("hf", "hub", "internal"; see `workbench.checkpoint.layouts`); default: the layout
    the model was read from, else `default_layout`. A model holding FP8 weights (`load_checkpoint(...,
    keep_fp8=True)`) is written in DeepSeek's FP8 layout: codes + scales per linear and per expert, and a
    `quantization_config` in config.json (none when every weight is high precision); one read with keep_fp8 is
    written back as it was read (names, dtypes, bytes). `dtype` converts the high-precision tensors only; the
    router stays fp32. Everything is checked before the first byte is written.
    """
    path = Path(path)
    entries, pairs = _stored_entries(model, layout, dtype)
    _check_quantized_pairs(entries, pairs)
    tensors = {name: t for name, (_, t) in entries.items()}
    cfg = _config_json(model, tensors)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_NAME), metadata=meta)
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path
