"""Pins and download locks: ``flock``s on files that exist only while someone uses them.

The blob store pins blobs by digest for as long as a run uses them; the environments pin an
environment by key for as long as a ComfyUI child runs in it. A pin is a shared ``flock`` on
``<pins>/<name>.pin``. Eviction takes an exclusive, non-blocking ``flock`` on the same file
and skips the entry when that fails, so an entry pinned by any process (another worker
container on the same volume included) is never deleted. The kernel drops the locks of a
process that dies, so a crashed worker leaves no stale pins. ``FileLock`` is the store's
one-download-per-digest lock: an exclusive ``flock`` on ``<locks>/<digest>.lock``.

Every such file is removed by whoever finds it unused: a pin by the last holder to let go, an
eviction lock and a download lock by their holder, stale ones by ``clean``. A store asked for
many digests that never arrive (refused URLs, wrong digests) would otherwise keep two files
for each, without bound. Removing a file that another process has opened but not yet locked
would let two holders lock two different files of one name, so every lock here follows one
protocol (``lock_current``): a file is removed only by a process holding its exclusive lock,
and whoever takes a lock checks afterwards that the file it locked is still the one at that
path, and starts over if not (its lock is then on a removed file nobody else can reach).
``filelock`` keeps its lock files for ever (deleting them is unsafe with it), which is why
the download lock is written here.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import filelock

POLL_S = 0.05
"""How often a waiting ``FileLock.acquire`` tries again."""


def lock_current(path: Path, operation: int) -> int | None:
    """Open ``path`` (created if absent) and ``flock`` it with ``operation``; return the open
    descriptor once the lock is on the file still at ``path``, or None when a non-blocking
    lock (``LOCK_NB``) is refused."""
    while True:
        # 0o666 so workers running as different users on one volume can share the files.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, path):
            return fd
        os.close(fd)  # its holder removed it before our lock landed: take the new one


def _is_current(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def remove_and_close(fd: int, path: Path) -> None:
    """Remove ``path`` and close ``fd``, which holds the exclusive lock of the file at
    ``path`` (so nobody else holds or will hold a lock on it)."""
    try:
        with suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def clean(directory: Path, suffix: str) -> int:
    """Remove every ``*<suffix>`` file in ``directory`` that nobody holds a lock on (left by
    a process that died); return how many."""
    removed = 0
    try:
        names = [n for n in os.listdir(directory) if n.endswith(suffix)]
    except FileNotFoundError:
        return 0
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        fd = lock_current(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is not None:
            remove_and_close(fd, path)
            removed += 1
    return removed


class FileLock:
    """An exclusive lock across processes on ``path``; the file exists only while the lock
    is held or waited for (``acquire``/``release`` as ``filelock.FileLock``, not reentrant).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, timeout: float = -1) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (negative: for ever); raise
        ``filelock.Timeout`` when it stays taken."""
        deadline = time.monotonic() + timeout if timeout >= 0 else None
        while True:
            fd = lock_current(self.path, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is not None:
                self._fd = fd
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise filelock.Timeout(str(self.path))
            # flock has no wait with a deadline: try again shortly, as filelock does.
            wait_s = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            time.sleep(max(0.0, wait_s))

    def release(self) -> None:
        """Give the lock back and remove its file (a waiter then locks a new one)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            remove_and_close(fd, self.path)


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
        held: list[tuple[int, str]] = []
        try:
            for name in sorted(set(names)):
                fd = lock_current(self.path(name), fcntl.LOCK_SH)
                assert fd is not None  # a blocking lock is never refused
                held.append((fd, name))
            yield
        finally:
            for fd, name in held:
                self._unpin(fd, name)

    def _unpin(self, fd: int, name: str) -> None:
        """Let go of a pin; the last holder removes the file."""
        try:
            # Not atomic (flock drops the shared lock first): whoever else takes the file
            # meanwhile either keeps it (we fail here) or removes it (it is not current).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # pinned by someone else: theirs to remove
            return
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, self.path(name)):
            remove_and_close(fd, self.path(name))
        else:
            os.close(fd)

    @contextmanager
    def evicting(self, name: str) -> Iterator[bool]:
        """Try to take the exclusive eviction lock; yield True if held (nobody pins the entry).

        The pin file is removed when the block ends with the lock held.
        """
        path = self.path(name)
        fd = lock_current(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            remove_and_close(fd, path)

    def is_pinned(self, name: str) -> bool:
        """Whether some process (this one included) pins the entry right now."""
        if not self.path(name).exists():
            return False
        with self.evicting(name) as free:
            return not free

    def clean(self) -> int:
        """Remove the pin files nobody holds (left by processes that died); return how many."""
        return clean(self.directory, ".pin")
