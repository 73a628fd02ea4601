"""Pins: blobs in use by a run, visible to every process on the volume.

A pin is a shared ``flock`` on ``<pins>/<sha256>.pin``, held for as long as the run uses the
blob. Eviction takes an exclusive, non-blocking ``flock`` on the same file and skips the blob
when that fails, so a blob pinned by any process (another worker container on the same
volume included) is never deleted. The kernel drops the locks of a process that dies, so a
crashed worker leaves no stale pins. Pin files are tiny and are kept: deleting a lock file
that another process may be opening at that moment would let two holders lock different
files of one name.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Pins:
    """Shared pins (runs) and exclusive eviction locks (gc) over files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """The pin file of a digest."""
        return self.directory / f"{sha256}.pin"

    @contextmanager
    def pin(self, digests: Iterable[str]) -> Iterator[None]:
        """Hold a shared pin on each digest for the duration of the block.

        Blocks briefly if a gc is deleting one of these blobs at this moment; the caller then
        finds it missing and downloads it again.
        """
        fds: list[int] = []
        try:
            for sha256 in sorted(set(digests)):
                fd = self._open(sha256)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    @contextmanager
    def evicting(self, sha256: str) -> Iterator[bool]:
        """Try to take the exclusive eviction lock; yield True if held (nobody pins the blob)."""
        fd = self._open(sha256)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def is_pinned(self, sha256: str) -> bool:
        """Whether some process (this one included) pins the digest right now."""
        if not self.path(sha256).exists():
            return False
        with self.evicting(sha256) as free:
            return not free

    def _open(self, sha256: str) -> int:
        # 0o666 so workers running as different users on one volume can share pins.
        fd = os.open(self.path(sha256), os.O_RDWR | os.O_CREAT, 0o666)
        return fd
