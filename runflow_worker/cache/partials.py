"""Partial downloads: process-unique temporary files, each locked by the process writing it.

A download writes ``<tmp>/<sha256>.<host>.<pid>.<random>.part`` (on the store's volume, so
publishing is a link, never a copy) while holding an exclusive ``flock`` on it. The lock, not
the pid in the name, says whether the writer is alive: pids repeat across containers sharing a
volume, locks do not lie, and the kernel drops them when a process dies. So:

- a ``.part`` whose lock can be taken is an orphan (its writer died, or gave up to resume
  later): it is adopted by the next download of the same digest (renamed to the new writer's
  name and continued with ``Range``) or removed;
- removing an orphan while its creator is between ``open`` and ``flock`` is harmless: the
  creator checks after locking that its path still names its file, and starts over if not.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from runflow_worker.cache.errors import CacheError

SUFFIX = ".part"
ASIDE_PREFIX = "aside-"
"""Names of partials no download adopts (``Partials.set_aside``)."""


@dataclass
class Partial:
    """A locked temporary file; ``close`` releases the lock (the file stays unless removed)."""

    path: Path
    fd: int

    def size(self) -> int:
        """Current size in bytes."""
        return os.fstat(self.fd).st_size

    def truncate(self) -> None:
        """Drop the content (it is known to be bad)."""
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        """Release the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Delete the file and release the lock."""
        self.path.unlink(missing_ok=True)
        self.close()


def _lock_if_orphan(path: Path) -> int | None:
    """Lock ``path`` if nobody holds it and it is still that file; return the fd, else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


class Partials:
    """The temporary-file directory of a store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._host = "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:32]

    def create(self, sha256: str) -> Partial:
        """A new, empty, locked temporary file for ``sha256``."""
        for _ in range(16):
            path = self.directory / (
                f"{sha256}.{self._host}.{os.getpid()}.{secrets.token_hex(4)}{SUFFIX}"
            )
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return Partial(path, fd)
            except OSError:
                pass  # removed or adopted in the instant before we locked it: try again
            os.close(fd)
        raise CacheError("cannot create a temporary file in the store", reason="io_error")

    def claim(self, sha256: str) -> Partial:
        """Adopt the largest orphaned partial download of ``sha256`` (removing any others) and
        rename it as ours, or create a new empty one."""
        orphans: list[tuple[int, Path, int]] = []
        for path in self.directory.glob(f"{sha256}.*{SUFFIX}"):
            fd = _lock_if_orphan(path)
            if fd is not None:
                orphans.append((os.fstat(fd).st_size, path, fd))
        orphans.sort(key=lambda item: item[0], reverse=True)
        for _size, path, fd in orphans[1:]:
            path.unlink(missing_ok=True)
            os.close(fd)
        if not orphans:
            return self.create(sha256)
        _size, path, fd = orphans[0]
        mine = self.directory / (
            f"{sha256}.{self._host}.{os.getpid()}.{secrets.token_hex(4)}{SUFFIX}"
        )
        os.rename(path, mine)  # the lock belongs to the file, so it follows the rename
        return Partial(mine, fd)

    def set_aside(self, partial: Partial) -> Partial:
        """``partial`` renamed so that no later download adopts it (``claim`` looks for names
        starting with the digest): what a private source writes is continued by nobody
        else's source, which would have shown only the rest of the bytes."""
        if self.is_aside(partial):
            return partial
        path = partial.path.with_name(ASIDE_PREFIX + partial.path.name)
        os.rename(partial.path, path)  # the lock belongs to the file, so it follows
        return Partial(path, partial.fd)

    @staticmethod
    def is_aside(partial: Partial) -> bool:
        """Whether ``partial`` was set aside (no download adopts it)."""
        return partial.path.name.startswith(ASIDE_PREFIX)

    def clean(self, *, min_age_s: float = 0.0, keep: Path | None = None) -> int:
        """Remove orphaned temporary files older than ``min_age_s``; return how many."""
        removed = 0
        now = time.time()
        for path in self.directory.glob(f"*{SUFFIX}"):
            if path == keep:
                continue
            fd = _lock_if_orphan(path)
            if fd is None:
                continue
            try:
                if now - os.fstat(fd).st_mtime >= min_age_s:
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def bytes_held(self) -> int:
        """Bytes in all temporary files (live and orphaned)."""
        total = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total
