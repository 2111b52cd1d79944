"""Checkpoint files and names: which files a checkpoint is (an index may name only regular files inside its
folder), and `CheckpointReader`, a lazy view that reads tensors one by one under our names, in any layout
(`workbench.checkpoint.layouts`), dequantizing FP8 blocks and FP4 groups on request."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import safe_open

from workbench.checkpoint.layouts import (
    FUSED_RE,
    LAYER_RE,
    CheckpointLayout,
    LayoutError,
    StoredName,
    detect_layout,
    stored_to_ours,
)
from workbench.config import ConfigError, ModelConfig
from workbench.model.families import family_for
from workbench.model.fp4 import FP4_BLOCK, dequantize_fp4
from workbench_kernels.reference import weight_dequant_ref

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)  # DeepSeek-V3's fp32 scale_inv, DeepSeek-V4's ue8m0 bytes
FP4_PACKED = torch.int8  # two e2m1 codes per byte (DeepSeek-V4's routed experts)
FP4_PACKED_ST = "I8"  # its safetensors header dtype


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the model its config describes; says which file and tensor."""


SourceKey = tuple[str, int | None, bool]  # (our name, expert of a per-expert tensor, is its scale)


@dataclass
class CheckpointSource:
    """How a loaded model's checkpoint stored it, so `save_checkpoint` writes the same files back: the layout and
    each tensor's stored name; read with `keep_fp8`, also each stored dtype, and the stored scales of the quantized
    weights the model holds dequantized (FP4 experts; FP8 weights of modules that cannot run FP8 codes), which a
    save encodes them back with."""

    layout: CheckpointLayout
    names: dict[SourceKey, str] = field(default_factory=dict)  # -> stored name
    dtypes: dict[SourceKey, torch.dtype] = field(default_factory=dict)  # -> stored dtype (keep_fp8 only)
    scales: dict[SourceKey, torch.Tensor] = field(default_factory=dict)  # weight held dequantized -> stored scale


def hf_to_ours(name: str) -> str:
    """`model.layers.3.self_attn.o_proj.weight` -> `layers.3.self_attn.o_proj.weight` (experts handled apart)."""
    return name[len("model."):] if name.startswith("model.") else name


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
                          ) -> torch.Tensor:
    """FP8 weight [N, K] x per-block scale_inv [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K] (partial edge blocks ok).

    The kernels' plain-torch reference does the arithmetic; this adds the checkpoint's error type.
    """
    try:
        return weight_dequant_ref(weight, scale_inv, block)
    except ValueError as e:
        raise CheckpointError(f"weight_scale_inv does not tile weight {weight.shape[0]}x{weight.shape[1]}: {e}") from e


def weight_files(path: Path) -> tuple[Path, list[Path]]:
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


@dataclass
class CheckpointReader:
    """Lazy view of a checkpoint directory (or a single .safetensors file): nothing is read until asked.

    `weight_map` and `shapes` come from the headers; `names_ours` maps every stored name to what it is in our terms
    (None: no tensor of ours), and `scale_of` each quantized weight to its scale, in whichever layout and scale
    spelling the checkpoint uses.
    """

    path: Path
    config: ModelConfig
    weight_map: dict[str, Path] = field(default_factory=dict)  # stored tensor name -> file
    block: tuple[int, int] = (128, 128)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stored tensor name -> shape, from the headers
    dtypes: dict[str, str] = field(default_factory=dict)  # stored tensor name -> safetensors dtype ("F8_E4M3", "I8")
    layout: CheckpointLayout = "hf"
    names_ours: dict[str, StoredName | None] = field(default_factory=dict)  # stored name -> ours
    scale_of: dict[str, str] = field(default_factory=dict)  # stored weight name -> stored scale name

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
        _, files = weight_files(path)
        weight_map: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for f in files:
            for name, (shape, dtype) in _header_entries(f).items():
                weight_map[name] = f
                shapes[name] = shape
                dtypes[name] = dtype
        try:
            layout = detect_layout(weight_map, config)
        except LayoutError as e:
            raise CheckpointError(f"{path}: {e}") from None
        stored = set(weight_map)
        names_ours = {n: stored_to_ours(n, layout, config.is_v4, stored) for n in weight_map}
        scale_of = {}
        for n, s in names_ours.items():
            if s is not None and s.scale:
                scale_of[n[: n.rindex(".")] + ".weight"] = n
        quant = dict(config.hf_extra).get("quantization_config") or {}
        block = tuple(quant.get("weight_block_size", (128, 128)))
        return cls(path, config, weight_map, (int(block[0]), int(block[1])), shapes, dtypes, layout, names_ours,
                   scale_of)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def ours(self, name: str) -> StoredName | None:
        """What the stored tensor `name` is in our terms (None: the model has no such tensor)."""
        return self.names_ours.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        with _SafeOpen(self.weight_map[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored (FP8 stays FP8, packed FP4 stays int8)."""
        with _SafeOpen(self.weight_map[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types for truncated data
                raise CheckpointError(f"{self.weight_map[name]}: cannot read tensor {name} ({e})") from None

    def scale(self, name: str) -> torch.Tensor:
        """The stored scale grid of the quantized weight `name`, checked to be fp32 or ue8m0."""
        scale_name = self.scale_of.get(name)
        if scale_name is None:
            t = self.raw(name)
            kind = "int8 (packed FP4)" if t.dtype == FP4_PACKED else str(t.dtype)
            want = name.removesuffix(".weight") + ".scale" if self.layout == "hub" else name + "_scale_inv"
            raise CheckpointError(f"{self.weight_map[name]}: {name} is {kind} but {want} is missing")
        s = self.raw(scale_name)
        if s.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{self.weight_map[scale_name]}: scale {scale_name} is {s.dtype}; FP8/FP4 scales are "
                                  "float32 or float8_e8m0fnu (ue8m0)")
        return s

    def is_weight(self, name: str) -> bool:
        """Whether a stored tensor is a linear's weight (the only tensors FP8 or FP4 may hold)."""
        s = self.names_ours.get(name)
        return s is not None and not s.scale and (s.ours.endswith(".weight") or s.expert is not None
                                                  or FUSED_RE.match(s.ours) is not None)

    def is_quantized(self, t: torch.Tensor, name: str) -> bool:
        """Whether a stored tensor holds codes that need a scale: FP8, or int8 packed FP4 (a weight)."""
        return t.dtype in FP8_CODES or (t.dtype == FP4_PACKED and self.is_weight(name))

    def get(self, name: str) -> torch.Tensor:
        """The tensor in high precision: FP8 blocks and FP4 groups dequantized with their scales (fp32)."""
        return self.dequantize(name, self.raw(name))

    def dequantize(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The stored tensor `t` called `name` in high precision (as it is, when it is not quantized)."""
        if not self.is_quantized(t, name):
            return t
        scale = self.scale(name)
        if t.dtype == FP4_PACKED:
            try:
                return dequantize_fp4(t, scale, FP4_BLOCK)
            except ValueError as e:
                raise CheckpointError(f"{self.weight_map[name]}: {name}: packed FP4 {tuple(t.shape)} with scale "
                                      f"{self.scale_of[name]} {tuple(scale.shape)}: {e}") from None
        try:
            return dequantize_fp8_blocks(t, scale, self.block)
        except CheckpointError as e:
            raise CheckpointError(f"{self.weight_map[name]}: {name}: {e}") from None

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"layers.{layer}."
        return [n for n, s in self.names_ours.items() if s is not None and not s.scale and s.ours.startswith(prefix)]

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """All high-precision tensors of one layer, by stored name: inspect a checkpoint larger than RAM layer by
        layer."""
        return {n: self.get(n) for n in self.layer_names(layer)}

    def layer_index(self, name: str) -> int | None:
        """The main or MTP layer index a stored tensor belongs to (None: a top-level tensor or an unknown name)."""
        s = self.names_ours.get(name)
        m = LAYER_RE.match(s.ours) if s is not None else None
        return int(m.group(1)) if m else None


def checkpoint_layout(path: str | Path, config: ModelConfig | None = None) -> CheckpointLayout:
    """The layout ("hf", "hub", "internal") of the checkpoint at `path`, from its tensor names alone (headers only);
    CheckpointError when the names fit none or mix two."""
    return CheckpointReader.open(path, config).layout


def _header_entries(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's name, shape and safetensors dtype in one file, from its header alone."""
    with _SafeOpen(path) as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                for name in f.keys()}  # noqa: SIM118 (no iter)


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
