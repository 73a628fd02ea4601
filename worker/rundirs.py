"""Per-run working directories, and the removal of those a killed worker left behind.

Each run gets ``runs-<owner>/<run_id>-<random>/`` (its ``input``, ``output``, ``temp`` and
``models`` trees) in the work directory (``WORK_SUBDIR`` of the cache), removed when the run
ends. ``<owner>`` names one pipeline (one worker process): it holds an exclusive ``flock`` on
``runs-<owner>.lock`` beside its directory for as long as it lives. A worker killed mid-run
(SIGKILL, out of memory, the node lost) cannot remove its run's files, but the kernel drops
its lock; the next worker to start on the volume, or ``runflow-worker cache gc``, finds the
owner directory unlocked and removes it. Workers sharing the volume never touch each
other's live directories.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path

WORK_SUBDIR = "work"
"""``<cache>/work``: the run directories, and ComfyUI's own scratch folders."""
_OWNER = re.compile(r"runs-[0-9a-f]{12}")


class RunDirs:
    """The run directories of one pipeline (claimed on first use, released by ``close``)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._owner: Path | None = None
        self._lock_fd = -1

    def create(self, run_id: str) -> Path:
        """A new, empty directory for one run of ``run_id``."""
        if self._owner is None:
            self._claim()
        assert self._owner is not None
        path = self._owner / f"{run_id}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def close(self) -> None:
        """Remove this pipeline's directory and let its lock go."""
        if self._owner is not None:
            shutil.rmtree(self._owner, ignore_errors=True)
            _unlink(self._owner.with_suffix(".lock"))
            self._owner = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _claim(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_run_dirs(self.work_dir)
        owner = self.work_dir / f"runs-{uuid.uuid4().hex[:12]}"
        # Locked under a name no sweeper looks at, then renamed into view: a sweeper must
        # never find the lock file of a live pipeline unlocked.
        hidden = self.work_dir / f".{owner.name}.lock.new"
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(hidden, owner.with_suffix(".lock"))
        owner.mkdir()
        self._owner, self._lock_fd = owner, fd


def remove_abandoned_run_dirs(work_dir: Path) -> list[str]:
    """Remove the run directories of pipelines that no longer run; return their names."""
    removed: list[str] = []
    try:
        entries = list(work_dir.iterdir())
    except FileNotFoundError:
        return removed
    owners = {p.name.removesuffix(".lock") for p in entries
              if _OWNER.fullmatch(p.name.removesuffix(".lock"))}
    for name in sorted(owners):
        lock = work_dir / f"{name}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its pipeline is alive
            # Unlocked: its pipeline died. A second sweeper that opened the lock file too
            # only finds the directory gone.
            shutil.rmtree(work_dir / name, ignore_errors=True)
            _unlink(lock)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
