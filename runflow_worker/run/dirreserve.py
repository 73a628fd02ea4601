"""Empty directories and files made ahead of time, off a run's path, handed out by rename.

A warm run makes a handful of new directories: its input's ``runflow_inputs/<content>/``
(``run.inputs``) and, with local storage, ``runs/<run_id>/<output_id>/``
(``run.storage``). On ext4 a ``mkdir`` allocates an inode and a block for the new directory
in a block group the allocator picks away from its parent's (so directories spread over
the disk), reading and journaling that group's metadata: 0.1-0.6 ms a call on the
benchmark's volume, ~1.4 ms of a warm run for those five. Renaming an existing empty
directory into place costs ~0.03 ms there. So the pipeline keeps a few empty directories
in its own (locked, swept) directory, makes more of them after each run, and a run takes
one by ``rename`` wherever it needs a new directory on the same file system, falling back
to ``mkdir`` when none is left or the rename cannot be made (another file system, a name
already taken).

Files likewise: creating one is the same allocation (~0.25 ms on that volume, measured with
``strace`` in a warm run), and a warm run creates two on its path, the file its input is
fetched into and the stored copy of its output. A reserved file is empty, made with the
mode a plain ``open(..., 0o666)`` gives (the process's umask applies); a caller that wants
another mode sets it (``take_file``).

No library does this; it is a rename and a list.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from pathlib import Path

RESERVE_SIZE = 16
"""Directories kept ready: a run of a few file inputs and outputs takes them all from here."""
FILE_RESERVE_SIZE = 8
"""Empty files kept ready: a run takes one per file input and one per stored output."""
_FILE_PREFIX = "f-"


class DirReserve:
    """Empty directories under ``home``, taken by ``makedirs`` and made by ``replenish``.

    Thread-safe: a run takes directories on its thread while ``replenish`` (the run
    directories' background thread) makes new ones.
    """

    def __init__(self, home: Path, size: int = RESERVE_SIZE,
                 file_size: int = FILE_RESERVE_SIZE) -> None:
        self.home = home
        self._home = os.fspath(home)
        self.size = size
        self.file_size = file_size
        self.taken = 0
        """Directories handed out by rename (for tests and the docs' figures)."""
        self.files_taken = 0
        """Files handed out by rename."""
        self._free: list[str] = []
        self._free_files: list[str] = []
        self._lock = threading.Lock()
        self._foreign: set[str] = set()
        """Roots a rename from ``home`` cannot reach (another file system)."""

    def makedirs(self, path: Path | str, *, under: Path | str) -> None:
        """Make the directory ``path`` and its missing parents below ``under``, like
        ``path.mkdir(parents=True, exist_ok=True)``: each new one is a reserved directory
        renamed into place when there is one left, else a ``mkdir``."""
        # Plain strings from here on: a few pathlib steps per folder were a good part of
        # this call's cost, and it runs several times on every run's path.
        path, under = os.fspath(path), os.fspath(under)
        if under in self._foreign or not _below(path, under):
            os.makedirs(path, exist_ok=True)
            return
        missing: list[str] = []
        probe = path
        while probe != under and not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for new in reversed(missing):
            if under in self._foreign or not self._take_as(new, under):
                os.makedirs(new, exist_ok=True)  # its parents: ``under`` itself, if gone

    def take_file(self, path: Path | str, *, under: Path | str,
                  mode: int | None = None) -> bool:
        """Put an empty reserved file at ``path`` (below ``under``, whose folders exist),
        with ``mode`` if given; False (nothing changed) when none is left or the rename
        cannot be made: the caller creates the file itself."""
        path, under = os.fspath(path), os.fspath(under)
        if under in self._foreign or not _below(path, under):
            return False
        if not self._rename_one(self._free_files, path, under, mode=mode):
            return False
        self.files_taken += 1
        return True

    def replenish(self) -> None:
        """Make new empty directories and files until ``size`` and ``file_size`` are ready
        (off a run's path); an error (a full disk) leaves fewer, and the runs make theirs."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            while True:
                with self._lock:
                    if len(self._free) >= self.size:
                        break
                name = uuid.uuid4().hex
                os.mkdir(self.home / name)
                with self._lock:
                    self._free.append(name)
            while True:
                with self._lock:
                    if len(self._free_files) >= self.file_size:
                        return
                name = _FILE_PREFIX + uuid.uuid4().hex
                os.close(os.open(self.home / name,
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
                with self._lock:
                    self._free_files.append(name)
        except OSError:
            return

    def _take_as(self, path: str, under: str) -> bool:
        """Rename a reserved directory to ``path``; False (nothing changed) when none is
        left or the rename fails."""
        # rename(2) would replace an empty directory already standing at ``path`` (another
        # thread made it meanwhile): as good as ``exist_ok`` for an empty one.
        if not self._rename_one(self._free, path, under):
            return False
        self.taken += 1
        return True

    def _rename_one(self, free: list[str], path: str, under: str, *,
                    mode: int | None = None) -> bool:
        """Rename one entry of ``free`` (directories or files) to ``path``, with ``mode``
        if given; False when none is left or the rename fails (the entry is kept unless it
        vanished; another file system is remembered for ``under``)."""
        with self._lock:
            if not free:
                return False
            name = free.pop()
        src = os.path.join(self._home, name)
        try:
            if mode is not None:
                os.chmod(src, mode)
            os.rename(src, path)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                self._foreign.add(under)
            if exc.errno != errno.ENOENT or os.path.lexists(src):
                with self._lock:
                    free.append(name)
            return False
        return True


def make_dirs(path: Path | str, *, under: Path | str, reserve: DirReserve | None) -> None:
    """``path`` and its missing parents made, from ``reserve`` when there is one (below
    ``under``), else by ``mkdir``."""
    if reserve is None:
        os.makedirs(path, exist_ok=True)
    else:
        reserve.makedirs(path, under=under)


def _below(path: str, under: str) -> bool:
    """Whether ``path`` is ``under`` or below it (both as ``os.fspath`` of a ``Path`` gives
    them: no trailing or doubled separators, no ``.`` or ``..``)."""
    return path == under or path.startswith(under.rstrip(os.sep) + os.sep)
