"""Per-run working directories, and the removal of those a killed worker left behind.

Everything lives in ``runs-<owner>/`` of the work directory (``WORK_SUBDIR`` of the cache)::

    child/                 the ComfyUI child's own root, writable to it (emptied at each
                           start): base/ (ComfyUI's default folders) and, during a run,
                           <run_id>-<random>/{input,output,temp}
    links/<run>/           the run's models and resources (hard links to the blobs),
                           read-only to the child: models/<key>, input/<key>; made by
                           the first link (a run without models or resources has none)
    stage/<run>/           the run's input, output and temp while the worker prepares them
    reserve/               empty directories made ahead, renamed into place where a run
                           needs a new one (``run.dirreserve``), out of the child's sight
    trash/                 ended runs' directories, renamed here out of the child's sight,
                           deleted in the background

The worker fills a run's ``stage`` directory out of the child's sight and renames it into
``child/`` just before the run executes (a warm child that ran hostile code could otherwise
plant symlinks where the worker writes); a resource appears in the run's ``input`` as a
symlink to its hard link in ``links``. When the run ends its directories leave the child's
sight on a background thread (``RunDirs.discard``, then ``tidy`` once the driver has written
the run's outcome): each is renamed into ``trash/`` (out of every child's sight, like
``stage/``), and deleted from there later on the same thread. The next run waits for the
renames (``RunDirs.settle``) before anything of it reaches a child, and before a child
starts: no run, and no new child, ever sees an earlier run's files, exactly as when they
were removed in line. It does not wait for the deletion: removing a run's directories is a
dozen file-system operations, 3-5 ms a run on the benchmark's volume (up to ~10 ms loaded),
where the renames are ~0.1 ms. ``RunDirs.quiesce`` and ``close`` wait for everything. After
the renames the same thread makes the next run's empty directories in advance
(``stage/.spare-*``: five ``mkdir`` calls, ~0.3 ms on ext4, ``input/runflow_inputs/``
included) and refills the reserve, then empties the trash; ``create`` renames the spare to
the run's name, or makes the directories itself when there is no spare. A spare was never
given to a child and holds nothing but its empty folders. Every directory a run makes is
one more to delete after it, which on a volume that discards freed blocks (the benchmark's)
is the costlier half: ``links/<run>/`` is made only by a run that links something.

A directory renamed out of the child's root stays reachable to a child process that kept a
descriptor of it, but only below it: the kernel refuses ``..`` from a directory moved out of
a bind mount (the sandbox's view), so the rest of ``trash/`` stays out of reach. What such a
process adds meanwhile is deleted with it, or at the next emptying (everything in
``trash/`` goes, not only the entries just added).

``<owner>`` names one pipeline (one worker process): it holds an exclusive ``flock`` on
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
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from runflow_worker.run.contract import INPUTS_SUBDIR
from runflow_worker.run.dirreserve import DirReserve

WORK_SUBDIR = "work"
"""``<cache>/work``: the run directories, and ComfyUI's own scratch folders."""
_OWNER = re.compile(r"runs-[0-9a-f]{12}")


RUN_SUBDIRS = ("input", "output", "temp")


@dataclass(frozen=True)
class RunPaths:
    """The directories of one run (see the module docstring)."""

    name: str
    stage: Path
    """Where the worker prepares ``input``, ``output`` and ``temp``."""
    live: Path
    """Where they are once ``enter`` moved them into the child's root."""
    links: Path
    """The run's models (``links/models``) and resources (``links/input``), read-only to
    the child."""
    child_root: Path

    def staged(self, name: str) -> Path:
        """``input``/``output``/``temp`` as the worker prepares it."""
        return self.stage / name

    def dir(self, name: str) -> Path:
        """``input``/``output``/``temp`` as the child sees it (after ``enter``)."""
        return self.live / name

    def enter(self) -> None:
        """Move the staged directories into the child's root (the last step before the
        run executes). The move is made relative to the child root's own descriptor, so a
        symlink the child left in its root is never followed."""
        fd = open_dir_nofollow(self.child_root)
        try:
            os.rename(self.stage, self.name, dst_dir_fd=fd)
        finally:
            os.close(fd)

    def hide(self, trash: Path) -> None:
        """Rename every directory of the run into ``trash`` (out of every child's sight) for
        a later deletion; one that cannot be renamed is removed in place."""
        for src, dst in ((self.stage, f"{self.name}.stage"), (self.links, f"{self.name}.links")):
            try:
                os.rename(src, trash / dst)
            except FileNotFoundError:
                pass
            except OSError:
                shutil.rmtree(src, ignore_errors=True)
        try:
            fd = open_dir_nofollow(self.child_root)
        except OSError:
            return
        moved = True
        try:
            # Relative to the root's descriptor: a symlink the child left in its root is
            # never followed; what stands at the run's name (a link, a file) is moved as it is.
            os.rename(self.name, trash / f"{self.name}.live", src_dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError:
            moved = False
        finally:
            os.close(fd)
        if not moved:
            self._remove_live()

    def remove(self) -> None:
        """Remove every directory of the run (never following a symlink)."""
        shutil.rmtree(self.stage, ignore_errors=True)
        shutil.rmtree(self.links, ignore_errors=True)
        self._remove_live()

    def _remove_live(self) -> None:
        try:
            fd = open_dir_nofollow(self.child_root)
        except OSError:
            return
        try:
            shutil.rmtree(self.name, dir_fd=fd)
        except NotADirectoryError:
            os.unlink(self.name, dir_fd=fd)  # the child replaced it with a file or link
        except FileNotFoundError:
            pass
        except OSError:
            # rmtree refuses a symlink: remove the link itself; other failures only leave
            # files that the next start of the child (or the owner's sweep) removes.
            try:
                os.unlink(self.name, dir_fd=fd)
            except OSError:
                pass
        finally:
            os.close(fd)


def open_dir_nofollow(path: Path) -> int:
    """A descriptor of the directory ``path``; OSError if its last component is a symlink."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


class RunDirs:
    """The run directories of one pipeline (claimed on first use, released by ``close``)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._owner: Path | None = None
        self._lock_fd = -1
        self._remover: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._spare: RunPaths | None = None
        self._spare_lock = threading.Lock()
        self._reserve: DirReserve | None = None
        self._roots_made = False
        self._discarded: list[RunPaths] = []
        """Runs handed to ``discard`` whose directories ``tidy`` has not yet started on."""
        self._parents: tuple[Path, Path, Path, Path] | None = None
        """The owner directory and its ``stage``, ``child`` and ``links`` (``_paths``)."""
        self._background: list[Future[None]] = []
        """The remover's work queued by ``tidy``, done or not."""

    @property
    def owner(self) -> Path:
        """This pipeline's directory (claimed now if it is not yet)."""
        if self._owner is None:
            self._claim()
        assert self._owner is not None
        return self._owner

    @property
    def reserve(self) -> DirReserve:
        """Empty directories made ahead, for a run's new directories on this volume
        (``run.dirreserve``): refilled after each run, on the remover thread."""
        if self._owner is None:
            self._claim()
        assert self._reserve is not None
        return self._reserve

    @property
    def child_root(self) -> Path:
        """The ComfyUI child's own root (writable to it; emptied at each start)."""
        return self.owner / "child"

    @property
    def trash(self) -> Path:
        """Where ended runs' directories wait for their deletion (out of every child's
        sight)."""
        return self.owner / "trash"

    def make_roots(self) -> None:
        """Make the child's root and the links root if they are not there: once a pipeline
        (they live as long as its directory; a child's start replaces the child's root by
        a new one, never leaves it missing), not at every run's config (four system calls,
        ~0.1-0.2 ms of a warm run on the benchmark's VM)."""
        if not self._roots_made:
            for root in (self.child_root, self.links_root):
                root.mkdir(parents=True, exist_ok=True)
            self._roots_made = True

    @property
    def links_root(self) -> Path:
        """Parent of the runs' ``links`` directories (read-only to the child)."""
        return self.owner / "links"

    def create(self, run_id: str) -> RunPaths:
        """New, empty directories for one run of ``run_id`` (staged)."""
        paths = self._paths(f"{run_id}-{os.urandom(4).hex()}")
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            # The spare stands in stage/: no parent to make (failing mkdir calls, ~0.1 ms
            # a run on the benchmark's volume). The child's root, where the run enters,
            # exists since its child started (the runner makes it then).
            try:
                os.rename(spare.stage, paths.stage)
                return paths
            except OSError:  # gone meanwhile: made anew below, whatever is left removed
                spare.remove()
                paths.remove()
        for parent in (paths.stage.parent, paths.child_root):
            parent.mkdir(exist_ok=True)
        _make(paths)
        return paths

    def discard(self, paths: RunPaths) -> None:
        """Hand over a finished run's directories: ``tidy`` (or the next ``settle``) moves
        them out of sight on the remover thread (see the module docstring)."""
        self._discarded.append(paths)

    def tidy(self) -> None:
        """Start the work that follows the discarded runs on the remover thread: their
        directories moved out of sight (``settle`` waits for that), then the next run's
        empty directories made in advance (under a name of their own; ``create`` renames
        them), the reserve refilled and the trash emptied (``quiesce`` waits for those).

        A driver calls it once the run's outcome is written: waking a thread costs the
        waker a few hundred microseconds on a small VM, which the caller's terminal record
        need not wait for. Called again with nothing discarded, it does nothing."""
        if not self._discarded:
            return
        batch, self._discarded = self._discarded, []
        if self._remover is None:
            self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-dirs")
        hidden: Future[None] = Future()
        self._pending.append(hidden)
        self._background = [f for f in self._background if not f.done()]
        self._background.append(self._remover.submit(self._after_runs, batch, hidden))

    def _after_runs(self, batch: list[RunPaths], hidden: Future[None]) -> None:
        """The remover's work for ``tidy`` (one wake of its thread a run)."""
        try:
            for paths in batch:
                paths.hide(self.trash)
        finally:
            hidden.set_result(None)
        # A run that starts meanwhile takes what is there and makes the rest with mkdir.
        self._prepare_spare()
        if self._reserve is not None:
            self._reserve.replenish()
        self._empty_trash()

    def _paths(self, name: str) -> RunPaths:
        owner = self.owner
        if self._parents is None or self._parents[0] is not owner:
            # Made once: four pathlib joins fewer on every run's path.
            self._parents = (owner, owner / "stage", owner / "child", owner / "links")
        _, stage, child, links = self._parents
        return RunPaths(name=name, stage=stage / name, live=child / name, links=links / name,
                        child_root=child)

    def _prepare_spare(self) -> None:
        with self._spare_lock:
            if self._spare is not None:
                return
        # Four new directories are ~0.25 ms of a warm run on ext4: made here, off the run's
        # path, they cost the next run one rename. Empty, never given to a child: the stage
        # is out of every child's sight.
        spare = self._paths(f".spare-{uuid.uuid4().hex[:12]}")
        try:
            _make(spare)
            # The callers' files' folder too (``run.inputs``): a run with a file input
            # would take it from the reserve, ~0.05-0.09 ms; one without leaves it empty.
            (spare.staged("input") / INPUTS_SUBDIR).mkdir()
        except OSError:
            spare.remove()
            return
        with self._spare_lock:
            self._spare = spare

    def settle(self) -> None:
        """Wait until the directories handed to ``discard`` are out of every child's sight
        (in the trash, or removed): started now if no ``tidy`` started them."""
        self.tidy()
        pending, self._pending = self._pending, []
        wait(pending)

    def quiesce(self) -> None:
        """``settle``, then wait for the background work queued after it too: the reserve's
        refill, the trash emptied."""
        self.settle()
        background, self._background = self._background, []
        wait(background)

    def _empty_trash(self) -> None:
        """Delete everything in the trash (never following a symlink): what earlier passes
        left (a child process still writing into its old run's directory) goes too."""
        try:
            entries = list(os.scandir(self.trash))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _unlink(Path(entry.path))

    def close(self) -> None:
        """Wait for queued removals, remove this pipeline's directory, let its lock go."""
        self.settle()
        if self._remover is not None:
            self._remover.shutdown(wait=True)
            self._remover = None
        self._spare = None  # inside the owner directory, removed with it
        if self._owner is not None:
            shutil.rmtree(self._owner, ignore_errors=True)
            _unlink(self._owner.with_suffix(".lock"))
            self._owner = None
            self._roots_made = False
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
        (owner / "trash").mkdir()
        self._owner, self._lock_fd = owner, fd
        self._reserve = DirReserve(owner / "reserve")


def _make(paths: RunPaths) -> None:
    """Make ``paths``' staged ``input``/``output``/``temp`` (its ``links`` come with the
    first link: ``cache.links.link_into``)."""
    paths.stage.mkdir()
    for sub in RUN_SUBDIRS:
        paths.staged(sub).mkdir()


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
