"""HF-format safetensors checkpoints <-> DeepSeekModel, with one name table between them.

- Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, tensor by tensor through
  safetensors' memory map, so peak memory is the model plus one tensor; `CheckpointReader` inspects a checkpoint
  larger than RAM one layer at a time.
- On disk routed experts are per expert (`mlp.experts.{e}.gate_proj.weight`), as DeepSeek and transformers save
  them; in memory they are stacked [E, ...]. transformers' fused in-memory `gate_up_proj` layout is read too.
- FP8 (e4m3) weights with `weight_scale_inv` in 128x128 blocks are dequantized block by block; a last partial
  block (V3's kv_a_proj_with_mqa is 576 x 7168) takes the scale of the block it falls in.
- Multi-token-prediction layers (index in [num_hidden_layers, num_hidden_layers + num_nextn_predict_layers)) are
  skipped, and the skip is reported; any other layer index the config does not declare is a mismatch.
- Before the model is built, the tensor names and shapes in the safetensors headers are checked against the config
  (a config of 20,000 layers fails in milliseconds, allocating nothing); every tensor read is checked for NaN/inf.
- An index may name only regular files inside the checkpoint folder (symlinks resolved): no absolute paths, no
  `..`, and nothing that is not a regular file is ever opened (a FIFO would block the reader forever).
- A model that kept its FP8 weights (`keep_fp8=True`) is saved in the same FP8 layout it was read from: e4m3
  codes + fp32 `weight_scale_inv` per linear and per expert under DeepSeek's names, and the
  `quantization_config` in config.json, so it reads back bit for bit (here and in transformers).
Every mismatch raises `CheckpointError` naming the file and tensor.
- `checkpoint_digest` identifies the weights by their bytes (sha256 of config.json and every weight file), cached
  by file size and mtime_ns beside the checkpoint or in the user cache dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

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


# ---------------------------------------------------------------------------------------------- files
def _weight_files(path: Path) -> tuple[Path, list[Path]]:
    """The checkpoint folder and the safetensors files the loader reads: a file given as is, the shards an index
    names, or `model.safetensors`; each one checked to be a regular file before anything opens it."""
    if not path.is_dir():
        _regular_file(path, str(path))
        return path.parent, [path]
    if (path / INDEX_NAME).exists() or (path / INDEX_NAME).is_symlink():
        return path, _index_shards(path / INDEX_NAME)
    if (path / SINGLE_NAME).exists():
        _regular_file(path / SINGLE_NAME, str(path))
        return path, [path / SINGLE_NAME]
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


def _index_shards(index: Path) -> list[Path]:
    """The shard files `index` names, refused unless each is a regular file inside the index's folder."""
    _regular_file(index, str(index))
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index: 'weight_map' must be an object of tensor "
                              f"name -> shard file name, got {type(weight_map).__name__}")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{index}: not a valid safetensors index: weight_map[{bad[0]!r}] is {bad[1]!r}, "
                              "expected a shard file name")
    files = [_shard_path(index, name) for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not (f.exists() or f.is_symlink())]
    if missing:
        raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
    for f in files:
        _regular_file(f, str(index))
    return files


def _shard_path(index: Path, name: str) -> Path:
    """`index`'s folder / `name`, refused when `name` is absolute, holds `..`, or resolves (symlinks followed)
    outside the folder: an index must never make the loader read another file of the machine.

    The one exception is a Hugging Face hub snapshot (`.../snapshots/<rev>/`), whose files are symlinks into the
    repo's `blobs/` folder.
    """
    root = index.parent
    win = PureWindowsPath(name)  # splits on both separators and knows drives
    if not name or PurePosixPath(name).is_absolute() or win.is_absolute() or win.drive or ".." in win.parts:
        raise CheckpointError(f"{index}: shard {name!r} is not a file name inside the checkpoint folder "
                              "(absolute paths and '..' are refused)")
    try:
        real, inside = (root / name).resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{index}: shard {name!r} cannot be resolved ({e})") from None
    hub_blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else None
    if not (real.is_relative_to(inside) or (hub_blobs is not None and real.is_relative_to(hub_blobs))):
        raise CheckpointError(f"{index}: shard {name!r} resolves to {real}, outside the checkpoint folder {inside}; "
                              "an index may name only files inside its folder")
    return root / name


def _regular_file(path: Path, where: str) -> None:
    """Refuse `path` unless it is a regular file (after symlinks), with os.stat alone: a FIFO is never opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot stat {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where}: {path} is not a regular file (a FIFO, device or directory is never read)")


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CheckpointReader:
    """Lazy view of an HF checkpoint directory (or a single .safetensors file): nothing is read until asked."""

    path: Path
    config: ModelConfig
    weight_map: dict[str, Path] = field(default_factory=dict)  # HF tensor name -> file
    block: tuple[int, int] = (128, 128)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # HF tensor name -> shape, from the headers

    @classmethod
    def open(cls, path: str | Path, config: ModelConfig | None = None) -> CheckpointReader:
        path = Path(path)
        root = path if path.is_dir() else path.parent
        if config is None:
            if (root / "config.json").exists():
                _regular_file(root / "config.json", str(root))
            try:
                config = ModelConfig.from_json(root / "config.json")
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        try:
            family_for(config.model_type)  # the family that will build the model; refused here, before any read
        except ConfigError as e:
            raise CheckpointError(f"{root / 'config.json'}: {e}") from None
        _, files = _weight_files(path)
        weight_map: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for name, shape in _header_shapes(f).items():
                weight_map[name] = f
                shapes[name] = shape
        quant = dict(config.hf_extra).get("quantization_config") or {}
        block = tuple(quant.get("weight_block_size", (128, 128)))
        return cls(path, config, weight_map, (int(block[0]), int(block[1])), shapes)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
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


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in one file, from its header alone."""
    with _SafeOpen(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (no iter)


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


# ---------------------------------------------------------------------------------------------- checks
def _check_layers(reader: CheckpointReader) -> None:
    """Refuse layer indices the config does not declare, from the tensor names alone (nothing built or read).

    Layers [N, N + num_nextn_predict_layers) are DeepSeek's multi-token-prediction modules (skipped when loading);
    any other index >= N, or a main layer without tensors, means config.json describes another model.
    """
    cfg = reader.config
    N, mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    held = sorted({int(m.group(1)) for m in map(_LAYER.match, map(hf_to_ours, reader.names())) if m})
    beyond = [i for i in held if i >= N + mtp]
    declared = f"{N} layers" + (f" (+ {mtp} multi-token-prediction)" if mtp else "")
    if beyond:
        raise CheckpointError(f"{reader.path}: config.json declares {declared} but the weights hold layer "
                              f"{beyond[0]}{f' (layers {held[0]}..{held[-1]})' if len(held) > 1 else ''}; "
                              "config.json does not match the weights")
    main = {i for i in held if i < N}
    if len(main) < N:
        lost = next(i for i in range(N) if i not in main)
        raise CheckpointError(f"{reader.path}: config.json declares {declared} but the weights hold {len(main)} "
                              f"(layer {lost} has no tensors); config.json does not match the weights")


def _check_shapes(reader: CheckpointReader) -> None:
    """Compare every header shape with what the config implies, before the full model is built.

    Layer j is compared with the same kind of layer (dense or MoE) of a meta model of at most a few layers, so the
    check costs milliseconds whatever num_hidden_layers says. Names the model has no place for are left to the
    load, which reports them all at once.
    """
    cfg = reader.config
    N = cfg.num_hidden_layers
    scan = range(min(N, cfg.first_k_dense_replace + max(cfg.moe_layer_freq, 1) + 1))
    dense = next((i for i in scan if not cfg.is_moe_layer(i)), None)
    moe = next((i for i in scan if cfg.is_moe_layer(i)), None)
    kinds = [i for i in (dense, moe) if i is not None]
    with torch.device("meta"):
        template = DeepSeekModel(cfg.replace(num_hidden_layers=max(kinds) + 1))
    want = {n: tuple(t.shape) for n, t in _loadable(template, cfg).items()}
    for hf_name in reader.names():
        ours = hf_to_ours(hf_name)
        m = _LAYER.match(ours)
        if hf_name.endswith("_scale_inv") or (m and int(m.group(1)) >= N):
            continue
        if m:
            same = moe if cfg.is_moe_layer(int(m.group(1))) else dense
            ours = f"layers.{same}.{ours[m.end():]}"
        expect = _expected_shape(ours, want)
        got = reader.shape(hf_name)
        if expect is not None and got != expect:
            raise CheckpointError(f"{reader.weight_map[hf_name]}: {hf_name}: shape {got}, the config implies "
                                  f"{expect}; config.json does not match the weights")


def _expected_shape(ours: str, want: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape a checkpoint tensor called `ours` (on-disk layout) must have; None: the model has no such tensor
    (reported at load with every other unexpected name; an expert index past E is checked there too)."""
    e = _EXPERT.match(ours)
    if e:
        stacked = want.get(f"layers.{e.group(1)}.mlp.experts.{e.group(3)}")
        return stacked[1:] if stacked else None  # one expert: [N, K] of the stacked [E, N, K]
    fused = _FUSED.match(ours)
    if fused and fused.group(2) == "gate_up_proj":  # transformers' [E, 2I, H]
        gate = want.get(f"layers.{fused.group(1)}.mlp.experts.gate_proj")
        return (gate[0], 2 * gate[1], gate[2]) if gate else None
    return want.get(ours)


# the first non-finite FP8 code of each sign's magnitude: e4m3fn's only one is NaN (S.1111.111); e5m2 is IEEE-like
# (exponent all ones: inf, then NaNs). Read as int8, +non-finite codes are >= it; read as uint8, -non-finite >= 0x80|it.
_FP8_FIRST_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _check_finite(t: torch.Tensor, hf_name: str, file: Path) -> None:
    """Refuse a floating tensor holding NaN or inf: one NaN weight turns every logit NaN, and one in
    `e_score_correction_bias` sends every token to expert 0 with finite logits, so neither may load quietly.

    Two reductions that propagate NaN and inf (min/max: ~30-50 GB/s on one core, against ~1 GB/s for isfinite),
    so a checkpoint of hundreds of GB pays seconds; FP8 codes are compared as integers, with no float copy.
    """
    if t.numel() == 0:
        return
    if t.dtype in _FP8_FIRST_NONFINITE:
        first = _FP8_FIRST_NONFINITE[t.dtype]
        if int(t.view(torch.int8).max()) < first and int(t.view(torch.uint8).max()) < 0x80 | first:
            return
        magnitude = t.view(torch.uint8) & 0x7F
        bad = int((magnitude >= first).sum())
        n_inf = int((magnitude == 0x7C).sum()) if t.dtype == torch.float8_e5m2 else 0
        n_nan = bad - n_inf
    elif t.is_floating_point():
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
        n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
    else:
        return
    raise CheckpointError(f"{file}: tensor {hf_name} holds {n_nan} NaN and {n_inf} inf of {t.numel()} values; "
                          "the checkpoint is corrupt (or was saved from a diverged run)")


def _loadable(model: DeepSeekModel, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint fills: every parameter, and the buffers it saves (V3's
    `e_score_correction_bias`; V2's routing has no bias, so its unused zero buffer is not read)."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if not n.endswith("e_score_correction_bias")
                   or cfg.topk_method == "noaux_tc"})
    return params


# ---------------------------------------------------------------------------------------------- loading
def _iter_model_tensors(reader: CheckpointReader, skipped: list[str], keep_fp8: bool = False
                        ) -> Iterator[tuple[str, int | None, torch.Tensor, str]]:
    """Yield (our name, expert index or None, tensor, HF name); MTP layers go to `skipped`.

    With `keep_fp8`, linear weights (`*proj.weight`, experts) come as stored, FP8 codes undequantized. Every
    tensor is checked for NaN/inf as it is read. Layers past the MTP ones come through and are unexpected (only
    `strict=False` gets that far: `_check_layers` refuses them first).
    """
    def read(hf_name: str, keep: bool) -> torch.Tensor:
        t = reader.raw(hf_name) if keep else reader.get(hf_name)
        _check_finite(t, hf_name, reader.weight_map[hf_name])
        return t

    L, mtp = reader.config.num_hidden_layers, reader.config.num_nextn_predict_layers
    for hf_name in reader.names():
        if hf_name.endswith("_scale_inv"):
            continue
        ours = hf_to_ours(hf_name)
        m = _LAYER.match(ours)
        if m and L <= int(m.group(1)) < L + mtp:
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
    The layer indices and shapes in the headers are checked against the config first (with `strict`, layers the
    config does not declare are refused; without, they are ignored like any unexpected tensor), and a tensor
    holding NaN or inf is refused by name.
    """
    reader = CheckpointReader.open(path, config)
    cfg = reader.config
    if keep_fp8 and reader.block != (128, 128):
        raise CheckpointError(f"{reader.path}: keep_fp8 needs 128x128 weight blocks, the checkpoint has {reader.block}")
    if strict:
        _check_layers(reader)
    _check_shapes(reader)
    fp8_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    params = _loadable(model, cfg)
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
    _check_finite(scale, hf_name + "_scale_inv", reader.weight_map[hf_name + "_scale_inv"])
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


# ---------------------------------------------------------------------------------------------- identity
DIGEST_CACHE_NAME = ".workbench-digest.json"
_HASH_BLOCK = 8 << 20  # bytes per read while hashing: large sequential reads, one reused buffer per thread
_RACY_NS = 3_000_000_000  # a file changed this recently is hashed but not cached: a rewrite of the same size within
# the file system's timestamp granularity (1 ns to 2 s) would keep its (size, mtime_ns) key (git's "racy" case)
_PACKAGE_DIR = Path(__file__).resolve().parent  # the bundled model lives here; an installed package is never written


def checkpoint_digest(path: str | Path) -> str:
    """`sha256:` + 16 hex digits over config.json and every byte of the weight files the loader reads.

    Traces, trace stores and replays are checked against it, so it changes when any weight byte changes (a
    fine-tune keeps every shape). Hashing streams each file (about 1.6 GB/s per core with SHA-NI; files in parallel
    threads), and each file's sha256 is cached by (size, mtime_ns) in `.workbench-digest.json` beside the
    checkpoint, or where that cannot be written (or for the bundled model) in the user cache dir: a checkpoint of
    hundreds of GB is hashed once, and a cache that cannot be read or written only costs the hashing again.
    """
    root, files = _weight_files(Path(path))
    h = hashlib.sha256()
    cfg = root / "config.json"
    if cfg.is_file():
        h.update(b"config.json\0" + hashlib.sha256(cfg.read_bytes()).digest())
    for f, file_hash in zip(files, _file_hashes(root, files), strict=True):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(file_hash))
    return "sha256:" + h.hexdigest()[:16]


def digest_cache_paths(path: str | Path) -> list[Path]:
    """Where a checkpoint's digest cache is looked for and written, in order: beside it (not for a checkpoint
    inside the installed package), then `$XDG_CACHE_HOME` (or ~/.cache) / moe-workbench / digests, keyed by the
    folder's absolute path."""
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    real = root.resolve()
    paths = [] if real.is_relative_to(_PACKAGE_DIR) else [root / DIGEST_CACHE_NAME]
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory: beside the checkpoint only
            return paths
    key = hashlib.sha256(str(real).encode()).hexdigest()[:24]
    return [*paths, Path(base) / "moe-workbench" / "digests" / f"{key}.json"]


def _file_hashes(root: Path, files: list[Path]) -> list[str]:
    """sha256 hex of each file: from a cache whose (size, mtime_ns) still match the file, else streamed; what was
    hashed goes back to the first cache that can be written."""
    caches = digest_cache_paths(root)
    entries = [_read_cache(p) for p in caches]
    names = [f.relative_to(root).as_posix() for f in files]
    stats = [os.stat(f) for f in files]
    cached = [_cached_hash(entries, n, st) for n, st in zip(names, stats, strict=True)]
    todo = [i for i, known in enumerate(cached) if known is None]
    started = time.time_ns()
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
        fresh = dict(zip(todo, pool.map(lambda i: _file_sha256(files[i]), todo), strict=True))
    hashes = [fresh[i] if known is None else known for i, known in enumerate(cached)]
    if not todo:
        return hashes
    keep: dict[str, dict[str, Any]] = {}
    for i, (name, st) in enumerate(zip(names, stats, strict=True)):
        now = os.stat(files[i])
        stable = (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        if stable and (i not in fresh or started - st.st_mtime_ns >= _RACY_NS):
            keep[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashes[i]}
    if any(names[i] in keep for i in todo):
        _write_cache(caches, {"version": 1, "path": str(root.resolve()), "files": keep})
    return hashes


def _cached_hash(entries: list[dict[str, Any]], name: str, st: os.stat_result) -> str | None:
    for files in entries:
        e = files.get(name)
        if (isinstance(e, dict) and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns
                and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
            return str(e["sha256"])
    return None


def _file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in `_HASH_BLOCK` blocks into one buffer (memory: one block)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    """A digest cache's per-file entries; {} when it is missing, unreadable or not ours."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return {}
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


def _write_cache(paths: list[Path], data: dict[str, Any]) -> None:
    """Write `data` atomically (temp file + rename: concurrent loaders never see half a file) to the first path
    that takes it; none taking it is not an error."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    for path in paths:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
            return
        except OSError:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
