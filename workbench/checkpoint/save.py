"""`save_checkpoint`: the model back to HF safetensors (per-expert names, sharded), FP8 weights kept in
DeepSeek-V3's layout with their `quantization_config`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench.checkpoint.files import INDEX_NAME, SINGLE_NAME, CheckpointError, ours_to_hf
from workbench.model.experts import Experts
from workbench.model.fp8_linear import FP8Linear
from workbench.model.transformer import DeepSeekModel

_STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")


_FP8_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


FP8_BLOCK = (128, 128)  # the only weight block keep_fp8 models hold (load_checkpoint refuses others)


def hf_state_dict(model: DeepSeekModel) -> dict[str, torch.Tensor]:
    """Our parameters under HF names, routed experts split per expert (the on-disk layout).

    FP8 weights kept from a checkpoint stay e4m3 codes; their scales go under DeepSeek's names, the stacked expert
    scales [E, ceil(N/128), ceil(K/128)] split like the weights: `...experts.{e}.gate_proj.weight_scale_inv`.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj, is_scale = stacked.groups()
            leaf = "weight_scale_inv" if is_scale else "weight"
            for e in range(t.shape[0]):
                out[ours_to_hf(f"{prefix}.{e}.{proj}.{leaf}")] = t[e].contiguous()
        else:
            out[ours_to_hf(name)] = t.contiguous()
    return out


def _check_fp8_pairs(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one FP8 code dtype of `tensors` (None: no FP8 weight), after checking that every FP8 weight has an fp32
    `weight_scale_inv` on its 128x128 grid and every scale a weight, so the written checkpoint loads again."""
    dtypes = {t.dtype for t in tensors.values() if t.dtype in _FP8_FORMATS}
    if len(dtypes) > 1:
        by_dtype = {d: next(n for n, t in tensors.items() if t.dtype == d) for d in dtypes}
        raise CheckpointError(f"FP8 weights in more than one format cannot share one quantization_config: {by_dtype}")
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            weight = tensors.get(name.removesuffix("_scale_inv"))
            if weight is None or weight.dtype not in _FP8_FORMATS:
                raise CheckpointError(f"{name}: a scale without an FP8 weight {name.removesuffix('_scale_inv')}")
            continue
        if t.dtype not in _FP8_FORMATS:
            continue
        scale = tensors.get(name + "_scale_inv")
        grid = (math.ceil(t.shape[0] / FP8_BLOCK[0]), math.ceil(t.shape[1] / FP8_BLOCK[1]))
        if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != grid:
            got = "missing" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
            raise CheckpointError(f"{name}: {t.dtype} {tuple(t.shape)} needs a float32 {name}_scale_inv of shape "
                                  f"{grid} (128x128 blocks), the model holds {got}")
    return next(iter(dtypes), None)


def _scales_are_ue8m0(model: DeepSeekModel) -> bool:
    """Whether the model's FP8 weights were kept with power-of-two scales (V3.1's `scale_fmt: ue8m0`)."""
    formats = {m.fmt.ue8m0 for m in model.modules() if isinstance(m, FP8Linear) and m.weight_scale_inv is not None}
    formats |= {m.fp8.ue8m0 for m in model.modules()
                if isinstance(m, Experts) and m.gate_proj_scale_inv is not None and m.fp8 is not None}
    if len(formats) > 1:
        raise CheckpointError("FP8 weights with fp32 and with ue8m0 (power-of-two) scales cannot share one "
                              "quantization_config")
    return formats == {True}


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


def save_checkpoint(model: DeepSeekModel, path: str | Path, *, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors, or shards + model.safetensors.index.json when over max_shard_bytes.

    A model holding FP8 weights (`load_checkpoint(..., keep_fp8=True)`) is written in DeepSeek-V3's FP8 layout:
    codes + `weight_scale_inv` per linear and per expert, and a `quantization_config` in config.json (none when
    every weight is high precision). `dtype` converts the high-precision tensors only; the router stays fp32.
    Everything is checked before the first byte is written.
    """
    path = Path(path)
    tensors = hf_state_dict(model)
    fp8_dtype = _check_fp8_pairs(tensors)
    cfg = model.config.to_hf_dict()
    cfg.setdefault("architectures", [model.config.architecture])
    base = cfg.pop("quantization_config", None)
    if fp8_dtype is not None:
        cfg["quantization_config"] = fp8_quantization_config(
            _FP8_FORMATS[fp8_dtype], _scales_are_ue8m0(model), _high_precision_linears(tensors),
            base if isinstance(base, dict) else None)
    if dtype is not None:
        tensors = {n: t if n.endswith(("gate.weight", "e_score_correction_bias", "_scale_inv"))
                   or t.dtype in _FP8_FORMATS else t.to(dtype) for n, t in tensors.items()}
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
