"""Finding and summarising trace stores under a root folder, safely: the logic behind the REST API.

Kept free of tornado so it is tested directly. Every path a client sends is resolved inside the root; `..`,
absolute paths and symlinks that lead out are refused (`PathRefusedError`). The walk is bounded in depth and entries,
skips hidden folders, never follows symlinked folders, and never descends into a store. A store that cannot be
read becomes an error entry rather than failing the listing.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MAX_DEPTH = 6
MAX_ENTRIES = 20_000
LOAD_SAMPLE_TOKENS = 50_000  # the expert-load picture reads at most this many tokens per store
PICTURE_MAX_ROWS = 64  # the sidebar's load picture: at most this many layer rows ...
PICTURE_MAX_COLS = 64  # ... and expert columns, whatever the model (V3: 58 x 256 is binned to 58 x 64)


class PathRefusedError(ValueError):
    """A client path that is absolute, climbs with `..`, or resolves outside the server root."""


def resolve_inside(root: Path, relative: str) -> Path:
    root = root.resolve()
    if relative in ("", "."):
        return root
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise PathRefusedError(f"absolute paths are refused: {relative!r}")
    if ".." in pure.parts:
        raise PathRefusedError(f"'..' is refused in paths: {relative!r}")
    target = (root / Path(*pure.parts)).resolve()
    if target != root and root not in target.parents:
        raise PathRefusedError(f"{relative!r} resolves outside the server root")
    return target


def store_attrs(folder: Path) -> dict[str, Any] | None:
    """Root attrs of a zarr v3 group that is a trace store (has `schema_version`), else None."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    attrs = data.get("attributes") or {}
    return attrs if "schema_version" in attrs else None


def find_stores(root: Path, under: str = "") -> dict[str, list[dict[str, Any]]]:
    """{"stores": [summary...], "errors": [{"path", "error"}...]} for trace stores below `under`."""
    root = root.resolve()
    start = resolve_inside(root, under)
    stores: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen = 0
    stack: list[tuple[Path, int]] = [(start, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            errors.append({"path": _rel(root, folder), "error": f"cannot list: {e.strerror}"})
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                errors.append({"path": _rel(root, folder), "error": f"listing stopped after {MAX_ENTRIES} entries"})
                return {"stores": stores, "errors": errors}
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            try:
                attrs = store_attrs(path)
            except (OSError, ValueError) as e:
                errors.append({"path": _rel(root, path), "error": f"unreadable store metadata: {e}"})
                continue
            if attrs is not None:
                try:
                    stores.append(_listing_entry(root, path, _opened_attrs(path)))
                except Exception as e:  # any reader failure is this store's problem, not the listing's
                    errors.append({"path": _rel(root, path), "error": f"cannot open store: {type(e).__name__}: {e}"})
            elif (path / "zarr.json").is_file():
                continue  # a zarr store of something else: not ours, not descended into
            elif depth + 1 < MAX_DEPTH:
                stack.append((path, depth + 1))
    stores.sort(key=lambda s: s["path"])
    return {"stores": stores, "errors": errors}


def _opened_attrs(path: Path) -> dict[str, Any]:
    """Attrs as `open_trace` reports them (committed token count and completeness derived from the writers)."""
    from workbench.trace import open_trace

    return dict(open_trace(path).attrs)


def _listing_entry(root: Path, path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    cfg = _model_config(attrs)
    return {
        "path": _rel(root, path),
        "name": path.name,
        "model": attrs.get("model_name") or cfg.get("architectures", [cfg.get("model_type", "?")])[0],
        "tokens": int(attrs.get("committed_tokens", 0)),
        "layers": int(cfg.get("num_hidden_layers", 0)),
        "experts": int(cfg.get("n_routed_experts", 0)),
        "created": attrs.get("created"),
        "complete": bool(attrs.get("complete", False)),
        "schema_version": attrs.get("schema_version"),
    }


def _model_config(attrs: dict[str, Any]) -> dict[str, Any]:
    cfg = attrs.get("model_config", {})
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return cfg if isinstance(cfg, dict) else {}


def summarize(root: Path, relative: str) -> dict[str, Any]:
    """The listing entry, per-layer expert load (share of token-slots, from up to LOAD_SAMPLE_TOKENS tokens) and
    `load_picture`, the same load binned to at most PICTURE_MAX_ROWS x PICTURE_MAX_COLS cells for the sidebar."""
    from workbench.trace import open_trace

    path = resolve_inside(root, relative)
    if store_attrs(path) is None:
        raise FileNotFoundError(f"{relative!r} is not a trace store")
    ds = open_trace(path)
    entry = _listing_entry(root.resolve(), path, dict(ds.attrs))
    n = min(ds.sizes.get("token", 0), LOAD_SAMPLE_TOKENS)
    ids = np.asarray(ds["expert_ids"].isel(token=slice(0, n)).values)  # [n, L, k]
    load = expert_load(ids, entry["experts"])  # [L, E]
    layers = [int(x) for x in ds["layer"].values]
    entry["moe_layers"] = layers
    entry["expert_load"] = load.round(5).tolist()
    entry["sampled_tokens"] = int(n)
    entry["load_picture"] = load_picture(load, layers)
    return entry


def expert_load(ids: np.ndarray, experts: int) -> np.ndarray:
    """[n, L, k] chosen expert ids (-1 = none) -> [L, E] share of each layer's chosen slots that went to each expert."""
    n, L, k = ids.shape
    flat = ids.transpose(1, 0, 2).reshape(L, n * k).astype(np.int64)  # [L, n*k]
    valid = (flat >= 0) & (flat < experts)
    offsets = np.arange(L, dtype=np.int64)[:, None] * experts  # one bincount for all layers: layer l owns [l*E, (l+1)*E)
    counts = np.bincount((flat + offsets)[valid], minlength=L * experts).reshape(L, experts)  # [L, E]
    return counts / np.maximum(valid.sum(axis=1, keepdims=True), 1)


def load_picture(load: np.ndarray, layers: list[int]) -> dict[str, Any]:
    """Bin [L, E] load to at most PICTURE_MAX_ROWS x PICTURE_MAX_COLS cells, each the mean load of its experts
    relative to a uniform router (1.0 = balanced), so the picture means the same for any expert count."""
    L, E = load.shape
    row_bins = _bins(L, PICTURE_MAX_ROWS)
    col_bins = _bins(E, PICTURE_MAX_COLS)
    relative = load * E  # [L, E]
    cells = [[float(relative[r0:r1, c0:c1].mean()) for c0, c1 in col_bins] for r0, r1 in row_bins] if E else []
    return {
        "rows": [[layers[r0], layers[r1 - 1]] for r0, r1 in row_bins],  # first and last MoE layer of each row
        "cols": [[c0, c1 - 1] for c0, c1 in col_bins],  # first and last expert of each column
        "cells": [[round(v, 4) for v in row] for row in cells],  # [rows, cols] load / uniform load
        "max": round(float(relative.max()), 4) if relative.size else 0.0,
    }


def _bins(n: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting range(n) into min(n, most) nearly equal consecutive bins."""
    count = min(n, most)
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _rel(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix() if path != root else ""
    return rel
