"""Git mirrors are removed once no checkout uses them: after their environments are evicted,
never while a fetch or checkout holds them, and never from under a worktree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.git import GitMirrors
from tests.cache.helpers import RepeatedGc
from tests.support.gitrepos import commit, git, make_repo

pytestmark = pytest.mark.timeout(120)

COMFY = "https://git.example/comfyanonymous/ComfyUI"
NODE = "https://git.example/acme/ComfyUI-Foo"


@pytest.fixture
def repos(tmp_path: Path) -> dict[str, Path | str]:
    comfy = make_repo(tmp_path / "origins" / "ComfyUI")
    node = make_repo(tmp_path / "origins" / "ComfyUI-Foo")
    return {"comfy": comfy, "comfy_v1": commit(comfy, {"main.py": "VERSION = 1\n"}),
            "comfy_v2": commit(comfy, {"main.py": "VERSION = 2\n"}),
            "node": node, "node_v1": commit(node, {"__init__.py": "NODE = 1\n"})}


def _mirrors(tmp_path: Path, repos: dict[str, Path | str]) -> GitMirrors:
    return GitMirrors(tmp_path / "cache" / "git", {COMFY: repos["comfy"], NODE: repos["node"]})


def test_evicting_an_environment_removes_the_mirrors_only_it_used(
    tmp_path: Path, repos: dict[str, Path | str]
) -> None:
    mirrors = _mirrors(tmp_path, repos)
    envs = Environments(tmp_path / "cache" / "envs", mirrors)
    with_node = EnvironmentSpec(COMFY, str(repos["comfy_v1"]),
                                (NodePin("ComfyUI-Foo", NODE, str(repos["node_v1"])),))
    old = envs.prepare(with_node)
    new = envs.prepare(EnvironmentSpec(COMFY, str(repos["comfy_v2"])))
    stamp = (old.root / "READY").stat().st_mtime - 3600  # the least recently used
    os.utime(old.root / "READY", (stamp, stamp))

    result = envs.gc(max_count=1)
    assert result.evicted == [old.key]
    assert result.mirrors_removed == [mirrors.mirror_path(NODE).name]
    assert not mirrors.mirror_path(NODE).exists()
    # ComfyUI's mirror still serves the environment kept: its checkout is a working git tree.
    assert mirrors.mirror_path(COMFY).is_dir()
    assert git(new.comfyui_dir, "rev-parse", "HEAD") == repos["comfy_v2"]
    assert not list((tmp_path / "cache" / "git").glob(".evicted-*"))
    # Needed again, the node is fetched again.
    again = envs.prepare(with_node)
    assert (again.custom_nodes_dir / "ComfyUI-Foo" / "__init__.py").read_text() == "NODE = 1\n"


def test_a_mirror_whose_lock_is_held_is_kept(
    tmp_path: Path, repos: dict[str, Path | str]
) -> None:
    mirrors = _mirrors(tmp_path, repos)
    mirror = mirrors.ensure_commit(NODE, str(repos["node_v1"]))  # fetched, no checkout yet
    with FileLock(str(mirror) + ".lock"):  # another worker fetching or checking out
        assert _mirrors(tmp_path, repos).gc() == []
    assert mirror.is_dir()
    assert mirrors.gc() == [mirror.name]  # unused and free
    assert not mirror.exists()


def test_a_gc_racing_checkouts_never_removes_a_mirror_in_use(
    tmp_path: Path, repos: dict[str, Path | str]
) -> None:
    mirrors = _mirrors(tmp_path, repos)
    broken = []
    # The gc spins as fast as it can: a checkout that let go of the mirror between its fetch
    # and its worktree would lose the mirror here.
    with RepeatedGc(_mirrors(tmp_path, repos).gc) as gc:
        for i in range(8):
            dest = tmp_path / f"checkout-{i}"
            mirrors.checkout(NODE, str(repos["node_v1"]), dest)
            gc.wait_rounds()  # whole rounds while the checkout exists
            try:
                git(dest, "rev-parse", "HEAD")
            except subprocess.CalledProcessError:  # the mirror went from under the worktree
                broken.append(i)
            shutil.rmtree(dest)  # unused now: the next rounds may remove the mirror
            gc.wait_rounds()
    assert broken == []
    assert gc.results.count(mirrors.mirror_path(NODE).name) == 8  # once after every checkout
