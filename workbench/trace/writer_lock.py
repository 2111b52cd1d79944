"""`WriterLock`: one writer per region of a trace store, held as an exclusive OS lock (flock; msvcrt on Windows).

The OS drops the lock however its process ends, kill -9 included, so a lock is never stale and `--resume` after a
crash needs no clean-up; `--shard I/N` writers each lock their own region and run together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path

from workbench.trace.schema import PROGRESS
from workbench.trace.zarr_io import TraceStoreError

LOCK_FILE = "writer-{}.lock"  # in the `progress` array's folder: zarr never lists an array's folder, while a file
# beside the arrays would make every `members()` / `xarray.open_zarr` warn about an unknown object

if sys.platform == "win32":
    import msvcrt

    def _lock_fd(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0; raises OSError when another handle holds it
else:
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError when another handle holds it


class WriterLock:
    """The exclusive lock on writer `writer`'s region of the store at `store`, held until `release` (or until the
    process ends: the OS drops it however the process dies, kill -9 included, so it is never stale).

    flock locks belong to an open file description, so two handles in one process exclude each other as two
    processes do. The file holds the holder's pid and host for the refusal message; it is never deleted while
    the store lives (removing a lock file another writer has open would let two writers hold "the" lock).
    """

    def __init__(self, store: Path, writer: int) -> None:
        self.store, self.writer = store, writer
        self._fd: int | None = None
        self.path = store / PROGRESS / LOCK_FILE.format(writer)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TraceStoreError(f"{store}: cannot create the writer lock {self.path} ({os_error_reason(e)})") from None
        try:
            _lock_fd(fd)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise TraceStoreError(f"{store}: another writer holds it (writer {writer}'s lock {self.path} is held "
                                  f"by {holder}); wait for it to finish or stop it, then rerun") from None
        if sys.platform != "win32":  # Windows forbids reading a locked byte, so there is no holder to show
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file does); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a forgotten handle frees its region once collected, not at interpreter exit
        with contextlib.suppress(Exception):  # late in interpreter shutdown `os` may be gone; the OS closes it then
            self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, from the pid and host its holder wrote (best effort: the file may be mid-write)."""
    try:
        pid, host = os.pread(fd, 200, 0).decode().split()
    except (OSError, ValueError, AttributeError):  # AttributeError: no pread (Windows)
        return "another process"
    if pid == str(os.getpid()) and host == socket.gethostname():
        return "another TraceStore handle in this process: close it first"
    return f"pid {pid} on {host}"


def os_error_reason(e: OSError) -> str:
    """What went wrong, in words a user acts on ("the disk is full")."""
    return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
