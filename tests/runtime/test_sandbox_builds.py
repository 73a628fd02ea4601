"""Environment builds run sandboxed: a hostile ``install.py`` writes only its environment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.errors import EnvironmentBuildError
from runflow_worker.cache.git import GitMirrors
from runflow_worker.run.sandboxing import build_sandbox
from runflow_worker.settings import Settings
from tests.support.gitrepos import COMFY, NODE, commit, make_repo

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed")]

MARK = "RUNFLOW" + "CANARY"

INSTALL = """
import json, os
report = {"wrote": [], "found": []}
for path in TARGETS:
    try:
        with open(path, "r+") as fh:  # the existing file, not one made in a private /tmp
            fh.seek(0, 2)
            fh.write("pwned")
        report["wrote"].append(path)
    except OSError:
        pass
for path in SECRETS:
    try:
        with open(path) as fh:
            if MARK in fh.read():
                report["found"].append(path)
    except OSError:
        pass
with open("ran.json", "w") as fh:
    json.dump(report, fh)
"""


def test_a_hostile_install_script_writes_only_its_environment(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    cache = tmp_path / "cache"
    other_env = cache / "envs" / ("1" * 16) / "ComfyUI" / "nodes.py"
    other_env.parent.mkdir(parents=True)
    other_env.write_text("# another environment\n")
    mirror = cache / "git" / "victim.git" / "config"
    mirror.parent.mkdir(parents=True)
    mirror.write_text("[core]\n")
    blob = cache / "blobs" / "ab" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    outside = tmp_path / "outside.txt"
    outside.write_text("the worker's file")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"key={MARK}x\n")
    monkeypatch.setenv("HOME", str(home))
    targets = [str(p) for p in (other_env, mirror, blob, outside)]
    before = {p: Path(p).read_bytes() for p in targets}
    script = (f"MARK = {'RUNFLOW'!r} + {'CANARY'!r}\nTARGETS = {targets!r}\n"
              f"SECRETS = {[str(home / '.aws' / 'credentials')]!r}\n" + INSTALL)
    comfy_repo = make_repo(tmp_path / "origins" / "ComfyUI")
    node_repo = make_repo(tmp_path / "origins" / "ComfyUI-Foo")
    comfy_commit = commit(comfy_repo, {"main.py": "1\n"})
    node_commit = commit(node_repo, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                     "install.py": script})
    envs = Environments(cache / "envs",
                        GitMirrors(cache / "git", {COMFY: comfy_repo, NODE: node_repo}),
                        sandbox=build_sandbox(Settings(cache_dir=cache)))
    spec = EnvironmentSpec(COMFY, comfy_commit, (NodePin("ComfyUI-Foo", NODE, node_commit),),
                           install_scripts=True)
    env = envs.prepare(spec)
    report: dict[str, Any] = json.loads(
        (env.comfyui_dir / "custom_nodes" / "ComfyUI-Foo" / "ran.json").read_text())
    assert report == {"wrote": [], "found": []}  # it ran, in its own directory only
    assert {p: Path(p).read_bytes() for p in targets} == before


def test_without_the_sandbox_setting_builds_are_not_wrapped(tmp_path: Path) -> None:
    assert build_sandbox(Settings(cache_dir=tmp_path, sandbox="none")) is None
    prefix = build_sandbox(Settings(cache_dir=tmp_path))
    assert prefix is not None
    argv = list(prefix(tmp_path / "env", {"PATH": "/usr/bin"}, tmp_path / "env"))
    assert "--share-net" in argv and "--unshare-all" in argv
    assert argv[argv.index("--bind") + 1] == str(tmp_path / "env")


def _hostile_build(tmp_path: Path, script: str, comfy_files: dict[str, str] | None = None
                   ) -> tuple[Environments, EnvironmentSpec]:
    """An environment whose one custom node runs ``script`` as its ``install.py``."""
    cache = tmp_path / "cache"
    comfy_repo = make_repo(tmp_path / "origins" / "ComfyUI")
    node_repo = make_repo(tmp_path / "origins" / "ComfyUI-Foo")
    comfy_commit = commit(comfy_repo, comfy_files or {"main.py": "1\n"})
    node_commit = commit(node_repo, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                     "install.py": script})
    envs = Environments(cache / "envs",
                        GitMirrors(cache / "git", {COMFY: comfy_repo, NODE: node_repo}),
                        sandbox=build_sandbox(Settings(cache_dir=cache)))
    return envs, EnvironmentSpec(COMFY, comfy_commit,
                                 (NodePin("ComfyUI-Foo", NODE, node_commit),),
                                 install_scripts=True)


@pytest.mark.parametrize("swap", ["site-packages", "custom_nodes"])
def test_a_build_cannot_make_the_child_bind_a_directory_outside_its_environment(
        tmp_path: Path, swap: str) -> None:
    """The child's sandbox binds the environment's site-packages where they really are: a
    build that swapped them for a symlink to the worker's home would have it shown (a
    symlink loop in place of custom_nodes is refused alike)."""
    home = tmp_path / "home" / ".aws"
    home.mkdir(parents=True)
    (home / "credentials").write_text(f"key={MARK}x\n")
    script = ("import os, sys\n"
              "env = os.path.abspath(os.path.join(os.getcwd(), '..', '..', '..'))\n")
    if swap == "site-packages":
        script += ("site = os.path.join(env, 'python', 'lib', 'python%d.%d' % "
                   "sys.version_info[:2])\n"
                   "os.makedirs(site, exist_ok=True)\n"
                   f"os.symlink({str(home)!r}, os.path.join(site, 'site-packages'))\n")
    else:
        script += ("nodes = os.path.join(env, 'ComfyUI', 'custom_nodes')\n"
                   "os.rename(nodes, nodes + '.old')\n"
                   "os.symlink(nodes, nodes)\n")  # a loop
    envs, spec = _hostile_build(tmp_path, script)
    with pytest.raises(EnvironmentBuildError, match="out of the environment"):
        envs.prepare(spec)
    assert not (envs.root / spec.key).exists()


def test_the_worker_never_writes_through_a_link_a_build_left_in_its_environment(
        tmp_path: Path) -> None:
    victims = [tmp_path / "worker-file-1", tmp_path / "worker-file-2"]
    for victim in victims:
        victim.write_text("the worker's own")
    script = ("import os\n"
              "env = os.path.abspath(os.path.join(os.getcwd(), '..', '..', '..'))\n"
              f"os.symlink({str(victims[0])!r}, os.path.join(env, 'environment.json'))\n"
              f"os.symlink({str(victims[1])!r}, os.path.join(env, 'READY.tmp'))\n")
    envs, spec = _hostile_build(tmp_path, script)
    env = envs.prepare(spec)
    assert [v.read_text() for v in victims] == ["the worker's own"] * 2
    assert json.loads((env.root / "environment.json").read_text())["key"] == spec.key


def test_a_comfyui_checkout_linking_out_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """A ComfyUI origin is any https repository: one whose ``custom_nodes`` or
    ``requirements.txt`` is a symlink would have the worker check custom nodes out, or read
    a file, wherever it points."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text(f"AWS_SECRET_ACCESS_KEY={MARK}\n")
    for name, target in (("custom_nodes", outside), ("requirements.txt", secret)):
        root = tmp_path / name
        envs, spec = _hostile_build(root, "")
        comfy_repo = root / "origins" / "ComfyUI"
        (comfy_repo / name).symlink_to(target)
        spec = EnvironmentSpec(COMFY, commit(comfy_repo, {}), spec.custom_nodes,
                               install_scripts=True)
        with pytest.raises(EnvironmentBuildError, match="symlink") as info:
            envs.prepare(spec)
        assert MARK not in str(info.value)
        assert list(outside.iterdir()) == []
