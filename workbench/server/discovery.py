"""Finding and summarising trace stores under a root folder, safely: the logic behind the REST API.

Kept free of tornado so it is tested directly. Every path a client sends is checked before the disk is touched
(`resolve_inside`): at most MAX_PATH_CHARS, no NUL character, not absolute, no `..`, no hidden component (a
name starting with "."), and it must resolve inside the root, through symlinks too. A store is served only when
its members (array folders and what they hold directly) resolve inside the root as well, since zarr follows
symlinks (`check_confined`).

The walk is bounded in depth, entries, stores, errors and time, skips hidden folders, never follows symlinked
folders, and never descends into a store. A store that cannot be read becomes an error entry rather than failing
the listing. The listing, the summary and the notebooks judge a store by one function (`describe_store`), so a
listed store is one the summary serves, and a store the summary refuses gets no notebook. Nothing a store claims
sizes a reply: text fields are cut to MAX_TEXT_CHARS, the per-expert load is sent only up to
SUMMARY_MAX_LOAD_CELLS numbers, and `open_trace` checks what the arrays claim against the disk (reader.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

MAX_DEPTH = 6
MAX_ENTRIES = 20_000  # folder entries looked at by one listing
MAX_STORES = 1_000  # stores in one listing
MAX_ERRORS = 100  # error entries in one listing; the rest are counted in one more entry
MAX_PATH_CHARS = 4096  # a client path longer than this is refused (PATH_MAX on Linux)
MAX_TEXT_CHARS = 200  # a model name, date or version a store claims, as a reply carries it
MAX_MESSAGE_CHARS = 500  # an error message, as a reply carries it
LOAD_SAMPLE_TOKENS = 50_000  # the expert-load picture reads at most this many tokens per store ...
LOAD_SAMPLE_IDS = 1 << 25  # ... and at most this many (token, layer, slot) expert ids (V3: 72k tokens' worth)
SUMMARY_MAX_EXPERTS = 4096  # a store claiming more routed experts gets no summary (422) ...
SUMMARY_MAX_LAYERS = 256  # ... nor one with more MoE layers: the load is counted per (layer, expert)
SUMMARY_MAX_LOAD_CELLS = 65_536  # `expert_load` ([L][E]) is sent up to this many numbers (< 1 MB), else null
PICTURE_MAX_ROWS = 64  # the sidebar's load picture: at most this many layer rows ...
PICTURE_MAX_COLS = 64  # ... and expert columns, whatever the model (V3: 58 x 256 is binned to 58 x 64)


class PathRefusedError(ValueError):
    """A client path that is absolute, climbs with `..`, is hidden, or resolves outside the server root (403)."""


class BadPathError(ValueError):
    """A client path that is not a usable path: too long, or holding a NUL character (400)."""


class StoreUnreadableError(ValueError):
    """A trace store whose metadata or arrays cannot be read, or that claims more than is read (422)."""


def shown(text: str, limit: int = 120) -> str:
    """`text` quoted for a message, cut to `limit` characters (a 60 MB path must not come back, nor be logged)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_inside(root: Path, relative: str) -> Path:
    """The real path of `relative` under `root`, or the refusal that names why (see the module docstring)."""
    root = root.resolve()
    _check_text(relative)
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith("\\") or (os.name == "nt" and PureWindowsPath(relative).drive):
        raise PathRefusedError(f"absolute paths are refused: {shown(relative)}")
    if ".." in pure.parts:
        raise PathRefusedError(f"'..' is refused in paths: {shown(relative)}")
    _refuse_hidden(pure.parts, relative)
    target = _resolve(root.joinpath(*pure.parts), relative)
    if target != root and root not in target.parents:
        raise PathRefusedError(f"{shown(relative)} resolves outside the server root")
    _refuse_hidden(target.relative_to(root).parts, relative)  # a visible name linked to a hidden folder
    return target


def resolve_folder(root: Path, relative: str) -> Path:
    folder = resolve_inside(root, relative)
    if not folder.is_dir():
        raise FileNotFoundError(f"{shown(relative)} is not a folder under the server root")
    return folder


def _check_text(relative: str) -> None:
    if len(relative) > MAX_PATH_CHARS:
        raise BadPathError(f"the path is {len(relative):,} characters, longer than {MAX_PATH_CHARS}: {shown(relative)}")
    if "\x00" in relative:  # the one character no file name holds (other control characters can be served)
        raise BadPathError(f"the path {shown(relative)} holds a NUL character, which no file name can")


def _refuse_hidden(parts: tuple[str, ...], relative: str) -> None:
    """Jupyter's contents API does not serve hidden files; neither does this API, through any path or link."""
    hidden = next((p for p in parts if p.startswith(".")), None)
    if hidden is not None:
        raise PathRefusedError(f"{shown(relative)} is refused: {hidden!r} is hidden (names starting with '.' are "
                               "not served)")


def _resolve(path: Path, relative: str) -> Path:
    """`path` with every symlink resolved; a loop or an unusable name is a path that does not resolve (404)."""
    try:
        target = path.resolve()
        target.stat()
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise FileNotFoundError(f"{shown(relative)} cannot be resolved (a symlink loop)") from None
    except (FileNotFoundError, NotADirectoryError):
        return target  # does not exist: the caller says what it expected to find
    except OSError as e:
        reason = "a symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise FileNotFoundError(f"{shown(relative)} cannot be resolved ({reason})") from None
    return target


def store_attrs(folder: Path) -> dict[str, Any] | None:
    """Root attrs of a zarr v3 group that is a trace store (has `schema_version`), else None; metadata that is
    too large, not JSON, too deeply nested or not an object raises StoreUnreadableError."""
    from workbench.trace.reader import MAX_METADATA_BYTES  # the reader's bound, so both refuse the same files

    meta = folder / "zarr.json"
    try:
        if not meta.is_file():
            return None
        size = meta.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise StoreUnreadableError(f"zarr.json is {size:,} bytes, more than the {MAX_METADATA_BYTES:,} read")
        data = json.loads(meta.read_bytes())
    except RecursionError:
        raise StoreUnreadableError("zarr.json is nested too deeply to read") from None
    except OSError as e:
        raise StoreUnreadableError(f"zarr.json cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise StoreUnreadableError(f"zarr.json is not JSON ({cut(str(e))})") from None
    if not isinstance(data, dict):
        raise StoreUnreadableError(f"zarr.json is not a JSON object (got {type(data).__name__})")
    attrs = data.get("attributes", {})
    if not isinstance(attrs, dict):
        raise StoreUnreadableError(f"zarr.json is not a JSON object in 'attributes' (got {type(attrs).__name__})")
    return attrs if "schema_version" in attrs else None


def check_confined(root: Path, store: Path) -> None:
    """Every member of `store`, and what each array folder holds directly, resolves inside `root`. Chunk files
    deeper down are not checked one by one (a store has thousands)."""
    for entry in _bounded_scan(store):
        _check_link(root, entry)
        if entry.is_dir():
            for inner in _bounded_scan(Path(entry.path)):
                _check_link(root, inner)


def _bounded_scan(folder: Path) -> list[os.DirEntry[str]]:
    from workbench.trace.reader import MAX_STORE_ENTRIES

    try:
        with os.scandir(folder) as entries:
            return list(itertools.islice(entries, MAX_STORE_ENTRIES))
    except OSError:
        return []  # unreadable: open_trace says so in its own words


def _check_link(root: Path, entry: os.DirEntry[str]) -> None:
    if not entry.is_symlink():
        return
    try:
        target = Path(entry.path).resolve()
    except (OSError, RuntimeError):
        target = None
    if target is None or (target != root and root not in target.parents):
        raise PathRefusedError(f"{_rel(root, Path(entry.path))} resolves outside the server root")


def _open_trace(path: Path) -> Any:
    """`open_trace`, imported when first needed (importing the server extension stays light)."""
    from workbench.trace import open_trace

    return open_trace(path)


def describe_store(root: Path, path: Path) -> tuple[dict[str, Any], Any]:
    """(listing entry, lazy Dataset) of the store at `path` (already resolved inside `root`); the one judgement of
    a store the listing, the summary and the notebooks share: 404 if it is not a store, 403 if a member leads
    out of the root, 422 (StoreUnreadableError) for anything unreadable."""
    rel = _rel(root, path)
    try:
        attrs = store_attrs(path)
    except StoreUnreadableError as e:
        raise StoreUnreadableError(f"{shown(rel)}: {e}") from None
    if attrs is None:
        raise FileNotFoundError(f"{shown(rel)} is not a trace store")
    check_confined(root, path)
    try:
        ds = _open_trace(path)
        return _listing_entry(root, path, dict(ds.attrs)), ds
    except Exception as e:  # any reader failure is this store's problem, reported in its own words
        raise StoreUnreadableError(_problem(root, path, e)) from None


def _problem(root: Path, path: Path, e: Exception) -> str:
    """`e` as a short message naming the store by its path under the root (the server's own folders stay private)."""
    message = f"{type(e).__name__}: {e}".replace(str(path), _rel(root, path) or "the server root")
    return cut(message.replace(str(root), "<root>"), MAX_MESSAGE_CHARS)


@dataclass
class _Walk:
    """One listing: what it found, what it could not read, and whether (and why) it stopped early."""

    root: Path
    budget_s: float | None
    stores: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    more_errors: int = 0
    seen: int = 0
    stopped: str | None = None
    deadline: float = math.inf

    def __post_init__(self) -> None:
        if self.budget_s is not None:
            self.deadline = time.monotonic() + self.budget_s

    def error(self, path: Path, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"path": _rel(self.root, path), "error": cut(message, MAX_MESSAGE_CHARS)})
        else:
            self.more_errors += 1

    def stop(self, why: str) -> None:
        self.stopped = f"listing stopped {why}; list a subfolder (?path=) to see the rest"

    def reply(self) -> dict[str, Any]:
        errors = list(self.errors)
        if self.more_errors:
            errors.append({"path": "", "error": f"{self.more_errors} more stores or folders could not be read"})
        if self.stopped:
            errors.append({"path": "", "error": self.stopped})
        return {"stores": sorted(self.stores, key=lambda s: s["path"]), "errors": errors,
                "truncated": self.stopped is not None}

    def run(self, start: Path) -> None:
        if self.visit(start, top=True):
            return
        stack: list[tuple[Path, int]] = [(start, 0)]
        while stack and not self.stopped:
            folder, depth = stack.pop()
            for entry in self.entries(folder):
                if time.monotonic() > self.deadline:
                    self.stop(f"at its time budget of {self.budget_s:g} s")
                if self.stopped:
                    return
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                path = Path(entry.path)
                if not self.visit(path) and not (path / "zarr.json").exists() and depth + 1 < MAX_DEPTH:
                    stack.append((path, depth + 1))  # a zarr node of something else is not descended into

    def entries(self, folder: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(itertools.islice(it, MAX_ENTRIES - self.seen + 1), key=lambda e: e.name)
        except OSError as e:
            self.error(folder, f"cannot list: {e.strerror}")
            return []
        room = MAX_ENTRIES - self.seen
        if len(entries) > room:
            self.stop(f"after {MAX_ENTRIES:,} entries")
            entries = entries[:room]
        self.seen += len(entries)
        return entries

    def visit(self, path: Path, top: bool = False) -> bool:
        """List `path` if it is a store (or report why not); True when it was a store or store-like."""
        try:
            attrs = store_attrs(path)
        except StoreUnreadableError as e:
            self.error(path, f"unreadable store metadata: {e}")
            return True
        if attrs is None:
            return False
        if top and path == self.root:
            self.error(path, "the server root is itself a trace store: its notebooks would be written beside it, "
                             "outside the root; start Jupyter in the folder above it")
        elif len(self.stores) >= MAX_STORES:
            self.stop(f"after {MAX_STORES:,} stores")
        else:
            try:
                self.stores.append(describe_store(self.root, path)[0])
            except PathRefusedError as e:
                self.error(path, f"refused: {e}")
            except StoreUnreadableError as e:
                self.error(path, f"cannot open store: {e}")
        return True


def find_stores(root: Path, under: str = "", budget_s: float | None = None) -> dict[str, Any]:
    """{"stores": [entry...], "errors": [{"path", "error"}...], "truncated": bool} for trace stores below `under`;
    the walk stops after `budget_s` seconds (None: no limit), MAX_ENTRIES entries or MAX_STORES stores, and says so
    in its last error entry."""
    root = root.resolve()
    walk = _Walk(root, budget_s)
    walk.run(resolve_folder(root, under))
    return walk.reply()


def _listing_entry(root: Path, path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    cfg = _model_config(attrs)
    model = attrs.get("model_name") or (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
    return {
        "path": _rel(root, path),
        "name": path.name,
        "model": cut(str(model)),
        "tokens": int(attrs.get("committed_tokens", 0)),
        "layers": int(cfg.get("num_hidden_layers", 0)),
        "experts": int(cfg.get("n_routed_experts", 0)),
        "created": None if attrs.get("created") is None else cut(str(attrs["created"])),
        "complete": bool(attrs.get("complete", False)),
        "schema_version": None if attrs.get("schema_version") is None else cut(str(attrs["schema_version"])),
    }


def _model_config(attrs: dict[str, Any]) -> dict[str, Any]:
    cfg = attrs.get("model_config", {})
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return cfg if isinstance(cfg, dict) else {}


def notebook_store(root: Path, relative: str) -> Path:
    """The store a notebook is asked for, once the summary would serve it (same refusals, same messages) and the
    notebook's folder, beside it, is inside the root."""
    root = root.resolve()
    path = resolve_inside(root, relative)
    if path == root and store_attrs(root) is not None:
        raise PathRefusedError("the server root is itself a trace store: its notebook would be written beside it, "
                               "outside the server root; start Jupyter in the folder above it")
    describe_store(root, path)
    return path


def summarize(root: Path, relative: str) -> dict[str, Any]:
    """The listing entry, per-layer expert load (share of token-slots, from up to LOAD_SAMPLE_TOKENS tokens; null
    beyond SUMMARY_MAX_LOAD_CELLS numbers) and `load_picture`, the same load binned to at most PICTURE_MAX_ROWS x
    PICTURE_MAX_COLS cells for the sidebar. Stores beyond SUMMARY_MAX_EXPERTS / SUMMARY_MAX_LAYERS are refused."""
    root = root.resolve()
    path = resolve_inside(root, relative)
    entry, ds = describe_store(root, path)
    ids = _sample_ids(root, path, entry, ds)  # [n, L, k]
    load = expert_load(ids, entry["experts"])  # [L, E]
    layers = [int(x) for x in ds["layer"].values]
    entry["moe_layers"] = layers
    entry["expert_load"] = load.round(5).tolist() if load.size <= SUMMARY_MAX_LOAD_CELLS else None
    entry["sampled_tokens"] = int(ids.shape[0])
    entry["load_picture"] = load_picture(load, layers)
    return entry


def _sample_ids(root: Path, path: Path, entry: dict[str, Any], ds: Any) -> np.ndarray:
    """The chosen experts of the first tokens, [n, L, k], once the store's claims fit the summary's caps."""
    rel, experts = shown(_rel(root, path)), entry["experts"]
    if "expert_ids" not in ds:
        raise StoreUnreadableError(f"{rel} holds no expert_ids (traced without them): there is no expert load to draw")
    n_tokens, L, k = ds["expert_ids"].shape
    if not 0 <= experts <= SUMMARY_MAX_EXPERTS:
        raise StoreUnreadableError(f"{rel} claims {experts} routed experts; the summary draws at most {SUMMARY_MAX_EXPERTS}")
    if L > SUMMARY_MAX_LAYERS:
        raise StoreUnreadableError(f"{rel} has {L} MoE layers; the summary draws at most {SUMMARY_MAX_LAYERS}")
    n = min(n_tokens, LOAD_SAMPLE_TOKENS, max(1, LOAD_SAMPLE_IDS // max(1, L * k)))
    try:
        return np.asarray(ds["expert_ids"].isel(token=slice(0, n)).values)
    except Exception as e:  # a chunk that does not decode
        raise StoreUnreadableError(_problem(root, path, e)) from None


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
    return path.relative_to(root).as_posix() if path != root else ""
