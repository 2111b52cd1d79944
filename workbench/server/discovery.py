"""Finding and summarising trace stores under a root folder, safely: the logic behind the REST API.

Kept free of tornado so it is tested directly. Every path a client sends is resolved inside the root; `..`,
absolute paths and symlinks that lead out are refused (`PathRefusedError`). The walk is bounded in depth and entries,
skips hidden folders, never follows symlinked folders, and never descends into a store. A store that cannot be
read becomes an error entry rather than failing the listing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MAX_DEPTH = 6
MAX_ENTRIES = 20_000
LOAD_SAMPLE_TOKENS = 50_000  # the expert-load picture reads at most this many tokens per store


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


def _store_attrs(folder: Path) -> dict[str, Any] | None:
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
                attrs = _store_attrs(path)
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
    """The listing entry plus per-layer expert load (share of token-slots, from up to LOAD_SAMPLE_TOKENS tokens)."""
    from workbench.trace import open_trace

    path = resolve_inside(root, relative)
    attrs = _store_attrs(path)
    if attrs is None:
        raise FileNotFoundError(f"{relative!r} is not a trace store")
    ds = open_trace(path)
    entry = _listing_entry(root.resolve(), path, dict(ds.attrs))
    n = min(ds.sizes.get("token", 0), LOAD_SAMPLE_TOKENS)
    experts = entry["experts"]
    ids = np.asarray(ds["expert_ids"].isel(token=slice(0, n)).values)  # [n, L, k]
    load = []
    for li in range(ids.shape[1]):
        chosen = ids[:, li].ravel()
        chosen = chosen[chosen >= 0]
        counts = np.bincount(chosen, minlength=experts)[:experts]
        load.append((counts / max(chosen.size, 1)).round(5).tolist())
    entry["moe_layers"] = [int(x) for x in ds["layer"].values]
    entry["expert_load"] = load
    entry["sampled_tokens"] = int(n)
    return entry


def _rel(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix() if path != root else ""
    return rel
