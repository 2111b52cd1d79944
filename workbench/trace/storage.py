"""Where a trace store's bytes live: a local folder or an object store (s3://, gs://, az://, memory://).

The store and its readers (store.py, reader.py) do every byte-level operation through one of these two classes,
so each keeps its own crash-safety mechanism:
- `LocalStorage`: every file written to a temporary name and renamed (never torn); one writer per region by an
  exclusive OS lock (`writer_lock.WriterLock`); a killed writer's temporary files are removed on resume.
- `ObjectStorage` (obstore, through zarr's `ObjectStore`): there is no rename and none is needed, since one PUT is
  atomic per key (S3: strong read-after-write consistency), so no partial object is ever visible. There is no
  lock either: a writer's progress row is committed with a compare-and-swap on its ETag (`If-Match`), so a
  duplicate attempt of a task (which dask allows after a missed heartbeat) can never overwrite a newer commit:
  its commit fails with `SupersededError`. A new store is claimed with one conditional create (`If-None-Match: *`).
- `FsspecStorage`: any other fsspec URL (hdfs://, sftp://, webdav, ...), through zarr's `FsspecStore`. One write
  per chunk as on object storage, but fsspec offers no conditional write: the claim is checked by reading it back
  and a duplicate attempt is not fenced, so run one writer per region (a single process, or `--shard`).
Credentials and endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...; obstore
reads them) plus `storage_options` (obstore config keys; the common fsspec names are accepted too; fsspec URLs
take their filesystem's own options).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workbench.trace.schema import PROGRESS
from workbench.trace.writer_lock import WriterLock
from workbench.trace.zarr_io import TraceStoreError, remove_partials

CLAIM = f"{PROGRESS}/workbench-claim"  # what a new store's creator PUTs first, conditionally: one creator wins
# (inside an array's prefix, which zarr never lists, so readers do not warn about an unknown object)
OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "azure", "memory")
_FSSPEC_NAMES = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key",
                 "token": "session_token", "region_name": "region"}  # fsspec / s3fs spelling -> obstore's


class ClaimedError(TraceStoreError):
    """Another creator claimed this object-store prefix first (or the store exists)."""


class SupersededError(TraceStoreError):
    """Another attempt committed this writer's region since this attempt read it: this one stops, unharmed."""


def is_url(location: object) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def storage_for(location: str | Path | Storage, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage behind a path, a `file://` / object-store / fsspec URL, or an existing storage (returned as is)."""
    if isinstance(location, LocalStorage | ObjectStorage | FsspecStorage):
        return location
    if is_url(location):
        scheme = str(location).split("://", 1)[0].lower()
        if scheme in OBJECT_SCHEMES:
            return ObjectStorage(str(location), storage_options)
        return FsspecStorage(str(location), storage_options)
    if storage_options:
        raise ValueError("storage_options apply to object-store URLs (s3://...), not to a local path")
    text = str(location)
    return LocalStorage(Path(text[len("file://"):] if text.startswith("file://") else text))


class LocalStorage:
    """A store folder on a local (or shared POSIX) file system."""

    local = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._made_dirs: set[Path] = set()

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalStorage, (self.path,))

    @property
    def zarr_store(self) -> Path:
        return self.path

    def exists(self) -> bool:
        return self.path.exists()

    def check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise TraceStoreError(f"{self.path} is a file, not a trace store folder; choose a new path")

    def lock(self, writer: int) -> WriterLock:
        return WriterLock(self.path, writer)

    def claim(self, run_id: str) -> None:
        """Nothing to claim: writer 0's OS lock and the emptiness check decide between two creators."""

    def holds_data(self) -> bool:
        return bool(_contents(self.path)) if self.path.is_dir() else False

    def remove_created(self, made_dir: bool) -> None:
        """Undo a create: the whole folder when the create made it, else everything in it but the lock files (the
        folder was empty before, as `create` checked)."""
        if made_dir:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in _contents(self.path):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def put(self, key: str, payload: bytes) -> None:
        """One file, written to a temporary name and renamed (as zarr's LocalStore does): never torn."""
        path = self.path / key
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            tmp.write_bytes(payload)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        return self.get(key), None  # one writer per region by the OS lock: nothing to compare

    def put_versioned(self, key: str, payload: bytes, version: str | None) -> str | None:
        self.put(key, payload)
        return None

    def modified(self, key: str) -> float | None:
        try:
            return (self.path / key).stat().st_mtime
        except FileNotFoundError:
            return None

    def drop_token_chunks(self, name: str, keep: int) -> None:
        """Remove chunk folders/files `name/c/<i>` with i >= keep (a trim)."""
        folder = self.path / name / "c"
        for entry in os.listdir(folder) if folder.is_dir() else []:
            if entry.isdigit() and int(entry) >= keep:
                target = folder / entry
                shutil.rmtree(target) if target.is_dir() else target.unlink()

    def remove_partials(self, owned: Callable[[str, int], bool] | None) -> None:
        remove_partials(self.path, owned)

    def count_entries(self, prefix: str, stem: str, enough: int) -> int:
        """Entries of folder `prefix` whose names start with `stem` (chunk keys), counted up to `enough`."""
        found = 0
        try:
            with os.scandir(self.path / prefix) as entries:
                for entry in entries:
                    if entry.name.startswith(stem) and entry.name != "zarr.json" and not entry.name.endswith(".partial"):
                        found += 1
                        if found >= enough:
                            break
        except (FileNotFoundError, NotADirectoryError):
            return 0
        return found

    def metadata_sizes(self, limit: int) -> Iterator[tuple[str, int | None]]:
        """(key, bytes) of the group's zarr.json and each member folder's (None: absent), at most `limit` members;
        more entries than that in the folder raise OverflowError with the count seen."""
        yield "zarr.json", self._size("zarr.json")
        with os.scandir(self.path) as entries:
            for i, entry in enumerate(entries):
                if i >= limit:
                    raise OverflowError(i + 1)
                if entry.is_dir():
                    key = f"{entry.name}/zarr.json"
                    meta = Path(entry.path, "zarr.json")
                    if meta.exists() and not meta.is_file():
                        raise TraceStoreError(f"{meta} is not a regular file")
                    yield key, self._size(key)

    def _size(self, key: str) -> int | None:
        try:
            return (self.path / key).stat().st_size
        except FileNotFoundError:
            return None


def _contents(path: Path) -> list[Path]:
    """What the folder holds besides writer lock files (which an empty folder gets when a writer takes it)."""
    entries = [e for e in path.iterdir() if e.name != PROGRESS]
    if (path / PROGRESS).is_dir():
        entries += [e for e in (path / PROGRESS).iterdir() if not (e.name.startswith("writer-") and e.suffix == ".lock")]
    return entries


class ObjectStorage:
    """A store under a URL prefix on an object store, through obstore (picklable: dask workers get a copy)."""

    local = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import obstore.store

        self.url = self.name = url.rstrip("/")
        self.options = dict(storage_options or {})
        config: dict[str, Any] = {}
        for k, v in [*self.options.items(), *dict(self.options.get("client_kwargs", {})).items()]:
            if k != "client_kwargs":
                config[_FSSPEC_NAMES.get(k) or k] = v
        endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
        client: Any = {"allow_http": True} if endpoint.startswith("http://") else None  # a loopback/dev endpoint
        try:
            self.store = obstore.store.from_url(self.url, client_options=client, **config)
        except Exception as e:  # obstore raises its own types for an unknown scheme or a bad option
            raise ValueError(f"cannot open {self.url} ({type(e).__name__}: {e})") from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectStorage, (self.url, self.options))

    @property
    def zarr_store(self) -> Any:
        import warnings

        import zarr.storage

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental": the conditional PUTs below are what we rely on
            return zarr.storage.ObjectStore(self.store)

    def exists(self) -> bool:
        return self.holds_data(include_claim=True)

    def check_folder(self) -> None:
        """Object stores have no files to confuse with folders."""

    def lock(self, writer: int) -> None:
        return None  # fencing is the progress row's compare-and-swap

    def claim(self, run_id: str) -> None:
        """Claim a new store with one conditional create; refuses one another creator claimed first."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        try:
            obstore.put(self.store, CLAIM, run_id.encode(), mode="create")
            return
        except AlreadyExistsError:
            pass
        holder = (self.get(CLAIM) or b"").decode(errors="replace")
        if holder == run_id:
            return  # our own create whose response was lost, then retried
        raise ClaimedError(f"{self.url} is claimed by another run ({holder or 'unknown'}): it exists or is being "
                              "created right now; pass --resume to continue it or choose a new URL")

    def holds_data(self, include_claim: bool = False) -> bool:
        import obstore

        batches = obstore.list(self.store, chunk_size=2)
        return any(include_claim or m["path"] != CLAIM for batch in batches for m in batch)

    def remove_created(self, made_dir: bool) -> None:
        """Delete every object under the prefix (the create claimed it: nothing else was there)."""
        import obstore

        for batch in obstore.list(self.store):
            obstore.delete(self.store, [m["path"] for m in batch])

    def put(self, key: str, payload: bytes) -> None:
        import obstore

        obstore.put(self.store, key, payload)

    def get(self, key: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:
            return None

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        import obstore

        try:
            result = obstore.get(self.store, key)
        except FileNotFoundError:
            return None, None
        return bytes(result.bytes()), result.meta["e_tag"]

    def put_versioned(self, key: str, payload: bytes, version: str | None) -> str | None:
        """PUT only if the object is still at `version` (If-Match), else SupersededError; returns the new version."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            result = obstore.put(self.store, key, payload, mode={"e_tag": version} if version else "create")
        except (PreconditionError, AlreadyExistsError):
            raise SupersededError(f"{self.url}: {key} was committed by another attempt since this one read it; this "
                             "attempt stops and leaves the region to it") from None
        return result["e_tag"]

    def modified(self, key: str) -> float | None:
        import obstore

        try:
            return float(obstore.head(self.store, key)["last_modified"].timestamp())
        except FileNotFoundError:
            return None

    def drop_token_chunks(self, name: str, keep: int) -> None:
        import obstore

        for batch in obstore.list(self.store, prefix=f"{name}/c/"):
            doomed = [m["path"] for m in batch if _token_index(m["path"], f"{name}/c/") >= keep]
            if doomed:
                obstore.delete(self.store, doomed)

    def remove_partials(self, owned: Callable[[str, int], bool] | None) -> None:
        """Nothing to remove: a PUT that did not finish left no object."""

    def count_entries(self, prefix: str, stem: str, enough: int) -> int:
        """Distinct first-level names under `prefix/` starting with `stem`, counted up to `enough`."""
        import obstore

        base = f"{prefix}/" if prefix else ""
        seen: set[str] = set()
        for batch in obstore.list(self.store, prefix=base + stem):
            for m in batch:
                first = m["path"][len(base):].split("/", 1)[0]
                if first != "zarr.json":
                    seen.add(first)
            if len(seen) >= enough:
                break
        return min(len(seen), enough)

    def metadata_sizes(self, limit: int) -> Iterator[tuple[str, int | None]]:
        import obstore

        listing = obstore.list_with_delimiter(self.store)
        sizes = {m["path"]: int(m["size"]) for m in listing["objects"]}
        yield "zarr.json", sizes.get("zarr.json")
        members = listing["common_prefixes"]
        if len(members) > limit:
            raise OverflowError(len(members))
        for member in members:
            key = f"{member.rstrip('/')}/zarr.json"
            try:
                yield key, int(obstore.head(self.store, key)["size"])
            except FileNotFoundError:
                yield key, None


class FsspecStorage:
    """A store under any other fsspec URL (no conditional writes: see the module docstring)."""

    local = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = self.name = url.rstrip("/")
        self.options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package is not installed
            raise ValueError(f"cannot open {self.url} ({type(e).__name__}: {e})") from None
        self.root = str(self.root).rstrip("/")

    def __reduce__(self) -> tuple[Any, ...]:
        return (FsspecStorage, (self.url, self.options))

    @property
    def zarr_store(self) -> Any:
        import zarr.storage

        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.options)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def exists(self) -> bool:
        return bool(self.fs.exists(self.root)) and bool(self.fs.find(self.root, maxdepth=None, withdirs=False))

    def check_folder(self) -> None:
        """A file at the URL is refused when zarr opens it."""

    def lock(self, writer: int) -> None:
        return None  # no lock and no fencing: one writer per region is the user's to keep

    def claim(self, run_id: str) -> None:
        """Best effort without a conditional write: write the claim unless there is one, then read it back."""
        holder = (self.get(CLAIM) or b"").decode(errors="replace")
        if not holder:
            self.put(CLAIM, run_id.encode())
            holder = (self.get(CLAIM) or b"").decode(errors="replace")
        if holder != run_id:
            raise ClaimedError(f"{self.url} is claimed by another run ({holder or 'unknown'}): it exists or is being "
                               "created right now; pass --resume to continue it or choose a new URL")

    def holds_data(self) -> bool:
        found = self.fs.find(self.root, withdirs=False) if self.fs.exists(self.root) else []
        return any(not str(p).endswith(CLAIM) for p in found)

    def remove_created(self, made_dir: bool) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def put(self, key: str, payload: bytes) -> None:
        self.fs.pipe_file(self._path(key), payload)

    def get(self, key: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        return self.get(key), None

    def put_versioned(self, key: str, payload: bytes, version: str | None) -> str | None:
        self.put(key, payload)
        return None

    def modified(self, key: str) -> float | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        return float(stamp.timestamp()) if hasattr(stamp, "timestamp") else (float(stamp) if stamp else None)

    def drop_token_chunks(self, name: str, keep: int) -> None:
        folder = self._path(f"{name}/c")
        for entry in self.fs.ls(folder, detail=False) if self.fs.exists(folder) else []:
            if _token_index(str(entry).rstrip("/").rsplit("/", 1)[-1], "") >= keep:
                self.fs.rm(entry, recursive=True)

    def remove_partials(self, owned: Callable[[str, int], bool] | None) -> None:
        """Nothing to remove: chunks are written whole, under their own names."""

    def count_entries(self, prefix: str, stem: str, enough: int) -> int:
        folder = self._path(prefix) if prefix else self.root
        try:
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return 0
        return min(enough, sum(1 for n in names if n.startswith(stem) and n != "zarr.json"))

    def metadata_sizes(self, limit: int) -> Iterator[tuple[str, int | None]]:
        entries = self.fs.ls(self.root, detail=True)
        if len(entries) > limit:
            raise OverflowError(len(entries))
        yield "zarr.json", self._size("zarr.json")
        for entry in entries:
            if entry.get("type") == "directory":
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                yield f"{name}/zarr.json", self._size(f"{name}/zarr.json")

    def _size(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self._path(key))["size"])
        except FileNotFoundError:
            return None


Storage = LocalStorage | ObjectStorage | FsspecStorage


def _token_index(path: str, prefix: str) -> int:
    first = path[len(prefix):].split("/", 1)[0]
    return int(first) if first.isdigit() else -1


def new_run_id() -> str:
    return f"{os.uname().nodename if hasattr(os, 'uname') else 'host'}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
