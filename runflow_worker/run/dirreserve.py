"""Empty directories made ahead of time, off a run's path, and handed out by rename.

A warm run makes a handful of new directories: its input's ``runflow_inputs/<folder>/
<content>/`` (``run.inputs``) and, with local storage, ``runs/<run_id>/<output_id>/``
(``run.storage``). On ext4 a ``mkdir`` allocates an inode and a block for the new directory
in a block group the allocator picks away from its parent's (so directories spread over
the disk), reading and journaling that group's metadata: 0.1-0.6 ms a call on the
benchmark's volume, ~1.4 ms of a warm run for those five. Renaming an existing empty
directory into place costs ~0.03 ms there. So the pipeline keeps a few empty directories
in its own (locked, swept) directory, makes more of them after each run, and a run takes
one by ``rename`` wherever it needs a new directory on the same file system, falling back
to ``mkdir`` when none is left or the rename cannot be made (another file system, a name
already taken).

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


class DirReserve:
    """Empty directories under ``home``, taken by ``makedirs`` and made by ``replenish``.

    Thread-safe: a run takes directories on its thread while ``replenish`` (the run
    directories' background thread) makes new ones.
    """

    def __init__(self, home: Path, size: int = RESERVE_SIZE) -> None:
        self.home = home
        self.size = size
        self.taken = 0
        """Directories handed out by rename (for tests and the docs' figures)."""
        self._free: list[str] = []
        self._lock = threading.Lock()
        self._foreign: set[Path] = set()
        """Roots a rename from ``home`` cannot reach (another file system)."""

    def makedirs(self, path: Path, *, under: Path) -> None:
        """Make the directory ``path`` and its missing parents below ``under``, like
        ``path.mkdir(parents=True, exist_ok=True)``: each new one is a reserved directory
        renamed into place when there is one left, else a ``mkdir``."""
        if under in self._foreign or not path.is_relative_to(under):
            path.mkdir(parents=True, exist_ok=True)
            return
        missing: list[Path] = []
        probe = path
        while probe != under and not os.path.isdir(probe):
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            if under in self._foreign or not self._take_as(new, under):
                new.mkdir(parents=True, exist_ok=True)  # parents: ``under`` itself, if gone

    def replenish(self) -> None:
        """Make new empty directories until ``size`` are ready (off a run's path); an error
        (a full disk) leaves fewer, and the runs make theirs with ``mkdir``."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            while True:
                with self._lock:
                    if len(self._free) >= self.size:
                        return
                name = uuid.uuid4().hex
                os.mkdir(self.home / name)
                with self._lock:
                    self._free.append(name)
        except OSError:
            return

    def _take_as(self, path: Path, under: Path) -> bool:
        """Rename a reserved directory to ``path``; False (nothing changed) when none is
        left or the rename fails."""
        with self._lock:
            if not self._free:
                return False
            name = self._free.pop()
        try:
            # rename(2) would replace an empty directory already standing at ``path``
            # (another thread made it meanwhile): as good as ``exist_ok`` for an empty one.
            os.rename(self.home / name, path)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                self._foreign.add(under)
            if exc.errno != errno.ENOENT or (self.home / name).is_dir():
                with self._lock:
                    self._free.append(name)
            return False
        self.taken += 1
        return True


def make_dirs(path: Path, *, under: Path, reserve: DirReserve | None) -> None:
    """``path`` and its missing parents made, from ``reserve`` when there is one (below
    ``under``), else by ``mkdir``."""
    if reserve is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        reserve.makedirs(path, under=under)
