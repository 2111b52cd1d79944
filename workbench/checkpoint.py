"""HF-format safetensors checkpoints <-> DeepSeekModel, with one name table between them.

- Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, tensor by tensor through
  safetensors' memory map, so peak memory is the model plus one tensor; `CheckpointReader` inspects a checkpoint
  larger than RAM one layer at a time.
- On disk routed experts are per expert (`mlp.experts.{e}.gate_proj.weight`), as DeepSeek and transformers save
  them; in memory they are stacked [E, ...]. transformers' fused in-memory `gate_up_proj` layout is read too.
- FP8 (e4m3) weights with `weight_scale_inv` in 128x128 blocks are dequantized block by block; a last partial
  block (V3's kv_a_proj_with_mqa is 576 x 7168) takes the scale of the block it falls in.
- Multi-token-prediction layers (index >= num_hidden_layers) are skipped, and the skip is reported.
- A model that kept its FP8 weights (`keep_fp8=True`) is saved in the same FP8 layout it was read from: e4m3
  codes + fp32 `weight_scale_inv` per linear and per expert under DeepSeek's names, and the
  `quantization_config` in config.json, so it reads back bit for bit (here and in transformers).
Every mismatch raises `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.config import ConfigError, ModelConfig
from workbench.model.experts import Experts
from workbench.model.families import family_for
from workbench.model.fp8 import install_fp8_weights
from workbench.model.fp8_linear import FP8Linear
from workbench.model.quant import FP8Format
from workbench.model.transformer import DeepSeekModel
from workbench_kernels.reference import weight_dequant_ref

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the model its config describes; says which file and tensor."""


# ---------------------------------------------------------------------------------------------- names
def hf_to_ours(name: str) -> str:
    """`model.layers.3.self_attn.o_proj.weight` -> `layers.3.self_attn.o_proj.weight` (experts handled apart)."""
    return name[len("model."):] if name.startswith("model.") else name


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


# ---------------------------------------------------------------------------------------------- FP8
def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
                          ) -> torch.Tensor:
    """FP8 weight [N, K] x per-block scale_inv [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K] (partial edge blocks ok).

    The kernels' plain-torch reference does the arithmetic; this adds the checkpoint's error type.
    """
    try:
        return weight_dequant_ref(weight, scale_inv, block)
    except ValueError as e:
        raise CheckpointError(f"weight_scale_inv does not tile weight {weight.shape[0]}x{weight.shape[1]}: {e}") from e


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CheckpointReader:
    """Lazy view of an HF checkpoint directory (or a single .safetensors file): nothing is read until asked."""

    path: Path
    config: ModelConfig
    weight_map: dict[str, Path] = field(default_factory=dict)  # HF tensor name -> file
    block: tuple[int, int] = (128, 128)

    @classmethod
    def open(cls, path: str | Path, config: ModelConfig | None = None) -> CheckpointReader:
        path = Path(path)
        root = path if path.is_dir() else path.parent
        if config is None:
            try:
                config = ModelConfig.from_json(root / "config.json")
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        try:
            family_for(config.model_type)  # the family that will build the model; refused here, before any read
        except ConfigError as e:
            raise CheckpointError(f"{root / 'config.json'}: {e}") from None
        files: list[Path]
        if path.is_file():
            files = [path]
        elif (root / INDEX_NAME).exists():
            try:
                index = json.loads((root / INDEX_NAME).read_text())
                shard_names = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{root / INDEX_NAME}: not a valid safetensors index ({e})") from None
            files = [root / s for s in shard_names]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{root / INDEX_NAME} lists shards that do not exist: {missing}")
        elif (root / SINGLE_NAME).exists():
            files = [root / SINGLE_NAME]
        else:
            raise CheckpointError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}")
        weight_map: dict[str, Path] = {}
        for f in files:
            for name in _keys(f):
                weight_map[name] = f
        quant = dict(config.hf_extra).get("quantization_config") or {}
        block = tuple(quant.get("weight_block_size", (128, 128)))
        return cls(path, config, weight_map, (int(block[0]), int(block[1])))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        with _SafeOpen(self.weight_map[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored (FP8 stays FP8)."""
        with _SafeOpen(self.weight_map[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types for truncated data
                raise CheckpointError(f"{self.weight_map[name]}: cannot read tensor {name} ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor in high precision: FP8 weights are dequantized with their `_scale_inv`."""
        t = self.raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in self.weight_map:
                raise CheckpointError(f"{name} is {t.dtype} but {scale_name} is missing")
            try:
                t = dequantize_fp8_blocks(t, self.raw(scale_name), self.block)
            except CheckpointError as e:
                raise CheckpointError(f"{self.weight_map[name]}: {name}: {e}") from None
        return t

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"model.layers.{layer}."
        return [n for n in self.weight_map if n.startswith(prefix) and not n.endswith("_scale_inv")]

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """All high-precision tensors of one layer: inspect a checkpoint larger than RAM layer by layer."""
        return {n: self.get(n) for n in self.layer_names(layer)}


def _keys(path: Path) -> list[str]:
    with _SafeOpen(path) as f:
        return list(f.keys())


class _SafeOpen:
    """safe_open with a CheckpointError naming the file when it is not safetensors or is truncated."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):  # safe_open returns an untyped handle
        try:
            self._cm = safe_open(str(self.path), framework="pt")
            return self._cm.__enter__()
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def _iter_model_tensors(reader: CheckpointReader, skipped: list[str], keep_fp8: bool = False
                        ) -> Iterator[tuple[str, int | None, torch.Tensor, str]]:
    """Yield (our name, expert index or None, tensor, HF name); MTP layers go to `skipped`.

    With `keep_fp8`, linear weights (`*proj.weight`, experts) come as stored, FP8 codes undequantized.
    """
    def read(hf_name: str, keep: bool) -> torch.Tensor:
        return reader.raw(hf_name) if keep else reader.get(hf_name)

    L = reader.config.num_hidden_layers
    for hf_name in reader.names():
        if hf_name.endswith("_scale_inv"):
            continue
        ours = hf_to_ours(hf_name)
        m = _LAYER.match(ours)
        if m and int(m.group(1)) >= L:
            skipped.append(hf_name)
            continue
        e = _EXPERT.match(ours)
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
    """
    reader = CheckpointReader.open(path, config)
    cfg = reader.config
    if keep_fp8 and reader.block != (128, 128):
        raise CheckpointError(f"{reader.path}: keep_fp8 needs 128x128 weight blocks, the checkpoint has {reader.block}")
    fp8_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if not n.endswith("e_score_correction_bias")
                   or cfg.topk_method == "noaux_tc"})
    values: dict[str, torch.Tensor] = {}
    expert_filled: dict[str, set[int]] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    tensors = _iter_model_tensors(reader, skipped, keep_fp8)
    for ours, expert, tensor, hf_name in tqdm(tensors, total=len(reader.names()), desc="loading", disable=not progress,
                                               unit="tensor"):
        fused = _FUSED.match(ours) if expert is None else None
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
        layers = sorted({int(_LAYER.match(hf_to_ours(s)).group(1)) for s in skipped})  # type: ignore[union-attr]
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


# ---------------------------------------------------------------------------------------------- writing
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


# ---------------------------------------------------------------------------------------------- misc
def build_meta(config: ModelConfig) -> DeepSeekModel:
    """The model's full module tree on the meta device: V3's 671B shape with no memory allocated."""
    with torch.device("meta"):
        return DeepSeekModel(config)


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of config.json and every safetensors header + size: identifies a checkpoint without reading GBs."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    cfg = root / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    files = [path] if path.is_file() else sorted(root.glob("*.safetensors"))
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100_000_000)))
        h.update(str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:16]
