"""New directories and files of a run come from a reserve made ahead (``run.dirreserve``):
renamed into place, made there when the reserve is empty or cannot reach, existing ones
untouched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runflow_worker.run.dirreserve import DirReserve
from runflow_worker.run.rundirs import RunDirs
from runflow_worker.run.storage import LocalStorage

pytestmark = pytest.mark.timeout(60)


def reserve(tmp_path: Path, size: int = 4, file_size: int = 2) -> DirReserve:
    res = DirReserve(tmp_path / "home", size=size, file_size=file_size)
    res.replenish()
    return res


def dirs_left(res: DirReserve) -> int:
    return sum(1 for p in res.home.iterdir() if p.is_dir())


def files_left(res: DirReserve) -> int:
    return sum(1 for p in res.home.iterdir() if p.is_file())


def plain_mode(tmp_path: Path) -> int:
    """The mode ``open(path, "w")`` gives a new file here (the umask applied)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    return probe.stat().st_mode & 0o777


def test_new_directories_are_reserved_ones_renamed_into_place(tmp_path: Path) -> None:
    res = reserve(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res.makedirs(root / "a" / "b", under=root)
    assert (root / "a" / "b").is_dir() and not any((root / "a" / "b").iterdir())
    assert res.taken == 2
    assert dirs_left(res) == 2  # two left
    res.replenish()
    assert dirs_left(res) == 4


def test_an_empty_reserve_falls_back_to_mkdir(tmp_path: Path) -> None:
    res = reserve(tmp_path, size=1)
    root = tmp_path / "root"
    root.mkdir()
    res.makedirs(root / "a" / "b" / "c", under=root)
    assert (root / "a" / "b" / "c").is_dir()
    assert res.taken == 1


def test_existing_directories_are_left_as_they_are(tmp_path: Path) -> None:
    res = reserve(tmp_path)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "kept.txt").write_text("x")
    res.makedirs(root / "a", under=root)
    res.makedirs(root / "a" / "new", under=root)
    assert (root / "a" / "kept.txt").read_text() == "x"
    assert res.taken == 1


def test_a_path_outside_its_root_is_made_by_mkdir_alone(tmp_path: Path) -> None:
    res = reserve(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res.makedirs(tmp_path / "elsewhere" / "x", under=root)
    assert (tmp_path / "elsewhere" / "x").is_dir()
    assert res.taken == 0


def test_another_file_system_is_remembered_and_the_reserve_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = reserve(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    real_rename = os.rename
    calls: list[str] = []

    def cross_device(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202 - os.rename's
        if str(dst).startswith(str(root)):
            calls.append(str(dst))
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", cross_device)
    res.makedirs(root / "a", under=root)
    res.makedirs(root / "b", under=root)
    assert (root / "a").is_dir() and (root / "b").is_dir()
    assert res.taken == 0 and len(calls) == 1  # tried once, then mkdir only
    assert dirs_left(res) == 4  # nothing lost from the reserve
    assert not res.take_file(root / "f", under=root) and files_left(res) == 2


def test_run_dirs_refill_their_reserve_after_each_run_out_of_the_childs_sight(
        tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path / "work")
    try:
        res = dirs.reserve
        assert not res.home.is_relative_to(dirs.child_root)
        assert not res.home.is_relative_to(dirs.links_root)
        run = dirs.create("r1")
        res.makedirs(run.staged("input") / "runflow_inputs" / "x", under=run.staged("input"))
        dirs.discard(run)
        dirs.quiesce()
        assert dirs_left(res) == res.size and files_left(res) == res.file_size
    finally:
        dirs.close()


def test_local_storage_takes_its_new_folders_from_the_reserve(tmp_path: Path) -> None:
    res = reserve(tmp_path)
    storage = LocalStorage(tmp_path / "outputs", reserve=res)
    src = tmp_path / "out.png"
    src.write_bytes(b"png")
    storage.put(src, "runs/r1/image/out.png", content_type="image/png", sha256="0" * 64)
    assert (tmp_path / "outputs" / "runs" / "r1" / "image" / "out.png").read_bytes() == b"png"
    # The storage root did not exist: it and runs/ by mkdir, runs/r1/ and its image/ from
    # the reserve.
    assert res.taken == 2
    storage.put(src, "runs/r2/image/out.png", content_type="image/png", sha256="0" * 64)
    assert res.taken == 4
    assert (tmp_path / "outputs" / "runs" / "r2" / "image" / "out.png").is_file()
    # Each stored copy was a reserved empty file, written over: the bytes and the mode of
    # a file the storage had created itself, nothing left behind.
    assert res.files_taken == 2 and files_left(res) == 0
    stored = tmp_path / "outputs" / "runs" / "r2" / "image" / "out.png"
    assert stored.read_bytes() == b"png"
    assert stored.stat().st_mode & 0o777 == plain_mode(tmp_path)
    assert [p.name for p in stored.parent.iterdir()] == ["out.png"]
    storage.put(src, "runs/r3/image/out.png", content_type="image/png", sha256="0" * 64)
    assert res.files_taken == 2  # none left: created as before
    assert (tmp_path / "outputs" / "runs" / "r3" / "image" / "out.png").read_bytes() == b"png"


def test_a_reserved_file_is_empty_and_takes_the_mode_asked_for(tmp_path: Path) -> None:
    res = reserve(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    assert res.take_file(root / "a.part", under=root, mode=0o600)
    assert (root / "a.part").read_bytes() == b"" and (root / "a.part").stat().st_mode & 0o777 == 0o600
    assert res.take_file(root / "b", under=root)
    assert (root / "b").stat().st_mode & 0o777 == plain_mode(tmp_path)
    assert not res.take_file(root / "c", under=root)  # none left
    assert not res.take_file(tmp_path / "elsewhere", under=root)  # outside its root
    assert res.files_taken == 2 and not (root / "c").exists()
    res.replenish()
    assert files_left(res) == 2


def test_paths_as_strings_and_a_sibling_sharing_the_prefix(tmp_path: Path) -> None:
    """Plain strings work as paths do; a folder whose name only starts like the root's is
    not below it, and gets a ``mkdir``, never a reserved directory."""
    root = tmp_path / "root"
    root.mkdir()
    res = reserve(tmp_path, size=2, file_size=1)
    res.makedirs(str(root / "a" / "b"), under=str(root))
    assert (root / "a" / "b").is_dir() and res.taken == 2
    sibling = tmp_path / "root-2" / "x"
    res.makedirs(str(sibling), under=str(root))
    assert sibling.is_dir() and res.taken == 2
    assert not res.take_file(str(tmp_path / "rootfile"), under=str(root))
    assert res.take_file(str(root / "a" / "f"), under=str(root))
    assert (root / "a" / "f").is_file() and res.files_taken == 1
