"""Run directories: removed after each run, and after a worker killed mid-run by the next."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.run.rundirs import RunDirs, remove_abandoned_run_dirs
from runflow_worker.runtime.sandbox import SandboxPlan, command_prefix, interpreter_paths
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

# A worker process that claims a run directory, says where, then waits to be killed.
HOLDER = """
import sys
from pathlib import Path
from runflow_worker.run.rundirs import RunDirs
run_dir = RunDirs(Path(sys.argv[1])).create("victim").stage
(run_dir / "secret.txt").write_text("left behind")
print(run_dir, flush=True)
sys.stdin.read()
"""


def start_holder(work: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_workers_run_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc, victim = start_holder(work)
    try:
        assert victim.is_dir() and victim.parent.parent.parent == work
        # Alive: another pipeline on the volume leaves it alone.
        assert remove_abandoned_run_dirs(work) == []
        mine = RunDirs(work)
        run_dir = mine.create("next").stage
        assert victim.is_dir() and run_dir.is_dir()
    finally:
        proc.kill()
        proc.wait()
    # Killed: its lock is gone, and the next sweep (a start, or `cache gc`) removes it.
    owner = victim.parent.parent
    assert remove_abandoned_run_dirs(work) == [owner.name]
    assert not owner.exists()
    assert not owner.with_suffix(".lock").exists()
    assert run_dir.is_dir()  # the live pipeline's directory stays
    mine.close()
    assert sorted(p.name for p in work.iterdir()) == []


def test_a_new_pipeline_sweeps_when_it_first_creates(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc, victim = start_holder(work)
    proc.kill()
    proc.wait()
    RunDirs(work).create("after-restart")
    assert not victim.exists()


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_the_next_runs_directories_are_made_in_advance_empty_and_named_for_it(
        tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    try:
        first = dirs.create("first")
        (first.staged("input") / "caller.png").write_bytes(b"first run's bytes")
        (first.links / "input").mkdir(parents=True)  # as a run's first link makes it
        (first.links / "input" / "res").write_bytes(b"x")
        dirs.discard(first)
        dirs.quiesce()
        owner = dirs.owner
        assert any(p.name.startswith(".spare-") for p in (owner / "stage").iterdir())
        second = dirs.create("second")
        assert second.name.startswith("second-") and second.stage.is_dir()
        # The spare became this run's: renamed, nothing of the first run in it or beside it
        # (the callers' files' folder comes empty with it).
        assert _tree(second.stage) == ["input", "input/runflow_inputs", "output", "temp"]
        assert not second.links.exists()  # made by the run's first link, if it has one
        assert [p.name for p in (owner / "stage").iterdir()] == [second.name]
        assert not first.stage.exists() and not first.links.exists()
        second.enter()
        assert _tree(second.live) == ["input", "input/runflow_inputs", "output", "temp"]
    finally:
        dirs.close()


def test_a_spare_that_vanished_is_replaced_by_new_directories(tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    try:
        dirs.discard(dirs.create("first"))
        dirs.quiesce()
        for spare in (dirs.owner / "stage").iterdir():
            spare.rename(tmp_path / "elsewhere")  # the spare is gone
        second = dirs.create("second")
        assert _tree(second.stage) == ["input", "output", "temp"]
        assert [p.name for p in (dirs.owner / "stage").iterdir()] == [second.name]
    finally:
        dirs.close()


def test_a_discarded_runs_directories_leave_every_childs_sight_at_settle(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's")
    dirs = RunDirs(tmp_path / "work")
    try:
        run = dirs.create("gone")
        (run.links / "models").mkdir(parents=True)
        (run.links / "models" / "m.safetensors").write_bytes(b"weights")
        run.enter()
        (run.dir("output") / "out.png").write_bytes(b"png")
        # What a hostile node may leave: a link out of the run, a folder of its own.
        (run.dir("temp") / "escape").symlink_to(outside)
        (run.dir("temp") / "deep" / "er").mkdir(parents=True)
        dirs.discard(run)
        dirs.tidy()
        dirs.settle()
        assert not run.live.exists() and not run.links.exists() and not run.stage.exists()
        assert sorted(p.name for p in dirs.child_root.iterdir()) == []
        assert [p.name for p in dirs.links_root.iterdir()
                if not p.name.startswith(".spare-")] == []
        dirs.quiesce()
        assert list(dirs.trash.iterdir()) == []
        assert outside.read_text() == "not the run's"  # the link went, never followed
    finally:
        dirs.close()


def test_settle_moves_what_no_tidy_started(tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    try:
        run = dirs.create("untidied")
        run.enter()
        dirs.discard(run)  # the driver never calls tidy (the ``run`` command, a test)
        dirs.settle()
        assert not run.live.exists() and not run.links.exists()
    finally:
        dirs.close()


def test_what_lands_in_the_trash_after_an_emptying_goes_at_the_next(tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    try:
        dirs.discard(dirs.create("first"))
        dirs.quiesce()
        # A child process that kept a descriptor of its old run's folder writes on into it
        # (in the trash now): the next emptying takes everything there.
        late = dirs.trash / "first-late.live"
        (late / "sub").mkdir(parents=True)
        (late / "sub" / "file").write_bytes(b"late")
        (dirs.trash / "stray-link").symlink_to(tmp_path / "nowhere")
        dirs.discard(dirs.create("second"))
        dirs.quiesce()
        assert list(dirs.trash.iterdir()) == []
    finally:
        dirs.close()


# Inside the sandbox: keep a descriptor of the run's folder, say so, wait for the word,
# then try to climb out of it (the folder has been moved to the trash meanwhile).
CLIMBER = """
import os, sys, time
run = sys.argv[1]
fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
open(os.path.join(run, "..", "ready"), "w").close()
while not os.path.exists(os.path.join(os.path.dirname(run), "go")):
    time.sleep(0.01)
try:
    up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    print("CLIMBED", sorted(os.listdir(up)))
except OSError as exc:
    print("REFUSED", exc.errno)
os.mkdir("late", dir_fd=fd)  # below it, still writable: the next emptying takes it
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_a_child_holding_its_old_runs_folder_cannot_climb_into_the_trash(
        tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path / "work")
    try:
        dirs.make_roots()
        first = dirs.create("first")
        first.enter()
        dirs.discard(first)
        dirs.settle()  # the first run's folder waits in the trash
        run = dirs.create("second")
        run.enter()
        plan = SandboxPlan(read_only=(str(dirs.links_root), *interpreter_paths()),
                           writable=(str(dirs.child_root),),
                           hidden=(str(tmp_path / "work"),), chdir=str(dirs.child_root))
        argv = [*command_prefix(plan, {"PATH": os.environ.get("PATH", "")}),
                sys.executable, "-c", CLIMBER, str(run.live)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: (dirs.child_root / "ready").exists(), 30, "the child to hold it")
            dirs.discard(run)
            dirs.settle()  # renamed into the trash, where the first run's folder waits
            assert not run.live.exists()
            (dirs.child_root / "go").touch()
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert out.split()[0] == "REFUSED", out  # `..` from a folder moved out of the bind
        # Its "late" folder may have come after the trash was emptied (the emptying starts
        # with the renames): the next run's emptying takes whatever is there.
        dirs.quiesce()
        dirs.discard(dirs.create("third"))
        dirs.quiesce()
        assert list(dirs.trash.iterdir()) == []
    finally:
        dirs.close()
