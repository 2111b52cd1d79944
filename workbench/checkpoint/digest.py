"""`checkpoint_digest`: which weights these are, by their bytes (sha256 of config.json and every weight file),
cached per file by size and mtime_ns beside the checkpoint or in the user cache dir."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from workbench.checkpoint.files import weight_files

DIGEST_CACHE_NAME = ".workbench-digest.json"
_HASH_BLOCK = 8 << 20  # bytes per read while hashing: large sequential reads, one reused buffer per thread
# a file changed this recently is hashed but not cached: a rewrite of the same size within the file system's
# timestamp granularity (1 ns to 2 s) would keep its (size, mtime_ns) key (git's "racy" case)
_RACY_NS = 3_000_000_000
# the workbench package: the bundled model lives in it, and an installed package is never written
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def checkpoint_digest(path: str | Path) -> str:
    """`sha256:` + 16 hex digits over config.json and every byte of the weight files the loader reads.

    Traces, trace stores and replays are checked against it, so it changes when any weight byte changes (a
    fine-tune keeps every shape). Hashing streams each file (about 1.6 GB/s per core with SHA-NI; files in parallel
    threads), and each file's sha256 is cached by (size, mtime_ns) in `.workbench-digest.json` beside the
    checkpoint, or where that cannot be written (or for the bundled model) in the user cache dir: a checkpoint of
    hundreds of GB is hashed once, and a cache that cannot be read or written only costs the hashing again.
    """
    root, files = weight_files(Path(path))
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
