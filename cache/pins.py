"""Pins: cache entries in use, visible to every process on the volume.

The blob store pins blobs by digest for as long as a run uses them; the environments pin an
environment by key for as long as a ComfyUI child runs in it. A pin is a shared ``flock`` on
``<pins>/<name>.pin``. Eviction takes an exclusive, non-blocking ``flock`` on the same file
and skips the entry when that fails, so an entry pinned by any process (another worker
container on the same volume included) is never deleted. The kernel drops the locks of a process that dies, so a
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

    def path(self, name: str) -> Path:
        """The pin file of an entry (a blob's digest, an environment's key)."""
        return self.directory / f"{name}.pin"

    @contextmanager
    def pin(self, names: Iterable[str]) -> Iterator[None]:
        """Hold a shared pin on each entry for the duration of the block.

        Blocks briefly if a gc is deleting one of these entries at this moment; the caller
        then finds it missing and makes it again.
        """
        fds: list[int] = []
        try:
            for name in sorted(set(names)):
                fd = self._open(name)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    @contextmanager
    def evicting(self, name: str) -> Iterator[bool]:
        """Try to take the exclusive eviction lock; yield True if held (nobody pins the entry)."""
        fd = self._open(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def is_pinned(self, name: str) -> bool:
        """Whether some process (this one included) pins the entry right now."""
        if not self.path(name).exists():
            return False
        with self.evicting(name) as free:
            return not free

    def _open(self, name: str) -> int:
        # 0o666 so workers running as different users on one volume can share pins.
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o666)
        return fd
