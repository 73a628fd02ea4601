"""Environments built from git mirrors: ComfyUI and custom nodes at their commits, and the
nodes' requirements installed without touching the image's packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.errors import (
    BuildCanceled,
    EnvironmentBuildError,
    GitError,
    OriginRefused,
)
from runflow_worker.cache.git import GitMirrors
from tests.cache.helpers import RepeatedGc
from tests.support.gitrepos import COMFY, NODE, Origins, commit, git, make_repo

pytestmark = pytest.mark.timeout(120)

@pytest.fixture
def origins(tmp_path: Path) -> Origins:
    return Origins(tmp_path)


@pytest.fixture(autouse=True)
def _offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing may come from a package index in tests: pip sees only --find-links.
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def test_builds_checkouts_at_their_commits_and_installs_requirements(
    origins: Origins, tmp_path: Path
) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE,
                                                             origins.node_v1),))
    env = origins.environments(tmp_path).prepare(spec)
    assert (env.comfyui_dir / "main.py").read_text() == "VERSION = 1\n"
    assert git(env.comfyui_dir, "rev-parse", "HEAD") == origins.comfy_v1
    node = env.custom_nodes_dir / "ComfyUI-Foo"
    assert git(node, "rev-parse", "HEAD") == origins.node_v1
    assert (env.root / "READY").read_text() == spec.key
    # The new requirement is importable from the environment's path; pytest, which the
    # image already has, was not installed again.
    code = "import tinydep, pytest, sys; print(tinydep.VALUE); print(pytest.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(map(str, env.sys_path))}, check=True,
                         timeout=60).stdout.splitlines()
    assert out[0] == "from the environment"
    assert not out[1].startswith(str(env.root))
    installed = [p.name for path in env.sys_path if path.exists() for p in path.iterdir()]
    assert "tinydep" in installed
    assert not any(name.lower().startswith("pytest") for name in installed)


def test_ready_environment_is_reused_without_git(origins: Origins, tmp_path: Path) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v1)
    first = origins.environments(tmp_path).prepare(spec)
    # No origin reachable any more: a prepared environment needs none.
    offline = Environments(tmp_path / "cache" / "envs",
                           GitMirrors(tmp_path / "cache" / "git", {}))
    assert offline.prepare(spec) == first


def test_another_commit_is_another_environment(origins: Origins, tmp_path: Path) -> None:
    envs = origins.environments(tmp_path)
    one = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    two = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v2))
    assert one.key != two.key
    assert (one.comfyui_dir / "main.py").read_text() == "VERSION = 1\n"
    assert (two.comfyui_dir / "main.py").read_text() == "VERSION = 2\n"
    assert len(list((tmp_path / "cache" / "git").glob("ComfyUI-*.git"))) == 1


def test_key_ignores_node_order_and_commit_case() -> None:
    a, b = NodePin("A", NODE, "a" * 40), NodePin("B", NODE + "-b", "b" * 40)
    one = EnvironmentSpec(COMFY, "c" * 40, (a, b), python="3.11.7", torch="2.13.0")
    two = EnvironmentSpec(COMFY, "C" * 40, (b, a), python="3.11.7", torch="2.13.0")
    assert one.key == two.key
    assert EnvironmentSpec(COMFY, "c" * 40, (a, b), python="3.11.7", torch="2.14.0").key != one.key


def test_requirement_against_an_installed_version_fails_the_build(
    origins: Origins, tmp_path: Path
) -> None:
    bad = commit(origins.node, {"requirements.txt": "pytest<1\n"}, "pin an old pytest")
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE, bad),))
    with pytest.raises(EnvironmentBuildError, match="ComfyUI-Foo"):
        origins.environments(tmp_path).prepare(spec)
    assert not (tmp_path / "cache" / "envs" / spec.key).exists()


def test_comfyui_requirements_are_installed_less_its_server_packages(
    origins: Origins, tmp_path: Path
) -> None:
    # A ComfyUI commit that needs a package the image lacks. Its server-only packages are
    # not on the offline index: the build succeeds only if they are left out.
    needs = commit(origins.comfy, {"requirements.txt": (
        "comfyui-frontend-package==1.27.10\nComfyUI_Workflow-Templates==0.1.95\n"
        "pytest\ntinydep==1.0  # new in this commit\nSQLAlchemy\nalembic\n")},
        "ComfyUI needs tinydep")
    env = origins.environments(tmp_path).prepare(EnvironmentSpec(COMFY, needs))
    out = subprocess.run([sys.executable, "-c", "import tinydep; print(tinydep.VALUE)"],
                         capture_output=True, text=True, check=True, timeout=60,
                         env={"PYTHONPATH": ":".join(map(str, env.sys_path))}).stdout
    assert out.strip() == "from the environment"

    clash = commit(origins.comfy, {"requirements.txt": "pytest<1\n"}, "ComfyUI pins old pytest")
    with pytest.raises(EnvironmentBuildError, match="requirements of ComfyUI failed"):
        origins.environments(tmp_path).prepare(EnvironmentSpec(COMFY, clash))


def test_unknown_commit_is_a_git_error(origins: Origins, tmp_path: Path) -> None:
    with pytest.raises(GitError, match="not found"):
        origins.environments(tmp_path).prepare(EnvironmentSpec(COMFY, "0" * 40))


def test_commit_not_on_any_branch_tip_is_found(origins: Origins, tmp_path: Path) -> None:
    # v1 is an ancestor of main's tip: a full fetch has it even where fetch-by-SHA is refused.
    git(origins.comfy, "config", "uploadpack.allowAnySHA1InWant", "false")
    env = origins.environments(tmp_path).prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    assert (env.comfyui_dir / "main.py").read_text() == "VERSION = 1\n"


def test_half_built_environment_is_rebuilt(origins: Origins, tmp_path: Path) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v1)
    leftover = tmp_path / "cache" / "envs" / spec.key
    (leftover / "ComfyUI").mkdir(parents=True)
    (leftover / "ComfyUI" / "junk").write_text("from a build that died")
    env = origins.environments(tmp_path).prepare(spec)
    assert not (env.comfyui_dir / "junk").exists()
    assert (env.comfyui_dir / "main.py").exists()


def test_cancel_stops_a_build(origins: Origins, tmp_path: Path) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v1)
    with pytest.raises(BuildCanceled):
        origins.environments(tmp_path).prepare(spec, cancel=lambda: True)
    assert not (tmp_path / "cache" / "envs" / spec.key).exists()


def test_concurrent_builds_of_one_key_build_once(origins: Origins, tmp_path: Path) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v2)
    results: list[object] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(origins.environments(tmp_path).prepare(spec))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and all(r == results[0] for r in results)
    worktrees = git(origins.mirrors(tmp_path).mirror_path(COMFY), "worktree", "list")
    assert worktrees.count(str(tmp_path / "cache" / "envs")) == 1


def test_cancel_stops_a_running_command_and_its_children(tmp_path: Path) -> None:
    from runflow_worker.cache.commands import run_command

    marker = tmp_path / "grandchild-survived"
    script = f"sleep 30 & wait; touch {marker}"
    polls = iter(range(3))
    started = time.monotonic()
    with pytest.raises(BuildCanceled):
        run_command(["sh", "-c", script], cancel=lambda: next(polls, None) is None)
    assert time.monotonic() - started < 5
    assert not marker.exists()


def test_command_timeout(tmp_path: Path) -> None:
    from runflow_worker.cache.commands import run_command

    with pytest.raises(TimeoutError):
        run_command(["sleep", "30"], timeout_s=0.3)


# ---------------------------------------------------------------------------- pip's environment

# An in-tree PEP 517 backend (no build requirement: builds offline): records the environment
# its build code runs with, as a setup.py or a git+ requirement's build could read it.
BACKEND = r"""
import base64, hashlib, json, os, zipfile

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(SEEN, "w") as f:
        json.dump(dict(os.environ), f)
    info = "recorder-1.0.dist-info/"
    files = {"recorder/__init__.py": "",
             info + "METADATA": "Metadata-Version: 2.1\nName: recorder\nVersion: 1.0\n",
             info + "WHEEL": "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\n"
                             "Tag: py3-none-any\n"}
    record = []
    for rel, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append("%s,sha256=%s,%d" % (rel, digest.rstrip(b"=").decode(), len(text)))
    files[info + "RECORD"] = "\n".join(record + [info + "RECORD,,"]) + "\n"
    name = "recorder-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
    return name
"""
PYPROJECT = """\
[project]
name = "recorder"
version = "1.0"

[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""


def test_build_code_pip_runs_gets_none_of_the_workers_credentials(
    origins: Origins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, seen = tmp_path / "recorder-src", tmp_path / "seen.json"
    source.mkdir()
    (source / "backend.py").write_text(f"SEEN = {str(seen)!r}\n{BACKEND}")
    (source / "pyproject.toml").write_text(PYPROJECT)
    node = commit(origins.node, {"requirements.txt": f"recorder @ {source.as_uri()}\n"},
                  "a requirement built from source")
    secrets = {"RUNFLOW_REDIS_URL": "redis://:pw@redis.internal:6379/0",
               "RUNFLOW_WEBHOOK_SECRET": "whsec_abc", "AWS_SECRET_ACCESS_KEY": "aws-secret",
               "GITHUB_TOKEN": "ghp_x",
               # credentials in the value, not the name
               "HTTPS_PROXY": "http://user:pass@proxy.invalid:3128",
               "UV_INDEX_URL": "https://user:tok@index.invalid/simple"}
    kept = {"HTTP_PROXY": "http://proxy.invalid:3128", "BUILD_FLAVOUR": "cuda",
            # pip's own settings stay, the index credentials it needs too
            "PIP_INDEX_URL": "https://user:tok@index.invalid/simple", "PIP_NO_INDEX": "1"}
    for name, value in {**secrets, **kept}.items():
        monkeypatch.setenv(name, value)
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE, node),))
    env = origins.environments(tmp_path).prepare(spec)
    assert any((path / "recorder").is_dir() for path in env.sys_path)
    environ = json.loads(seen.read_text())
    assert not set(secrets) & set(environ)
    assert {name: environ.get(name) for name in kept} == kept


# ---------------------------------------------------------------------------- eviction


def _age(env_root: Path, seconds_ago: float) -> None:
    """Make an environment look last used ``seconds_ago``."""
    stamp = time.time() - seconds_ago
    os.utime(env_root / "READY", (stamp, stamp))


def test_gc_keeps_the_most_recently_used_and_forgets_their_worktrees(
    origins: Origins, tmp_path: Path
) -> None:
    envs = origins.environments(tmp_path)
    old = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    new = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v2))
    _age(old.root, 3600)
    listed = envs.ls()
    assert [i.key for i in listed] == [new.key, old.key]
    assert all(i.ready and not i.pinned and i.size_bytes for i in listed)

    result = envs.gc(max_count=1)
    assert result.evicted == [old.key] and result.remaining == 1
    assert not old.root.exists() and (new.root / "READY").exists()
    worktrees = git(origins.mirrors(tmp_path).mirror_path(COMFY), "worktree", "list")
    assert str(old.root) not in worktrees and str(new.root) in worktrees
    assert not list((tmp_path / "cache" / "envs").glob(".evicted-*"))
    # Evicted is not lost: the next run pinning it builds it again.
    again = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    assert (again.comfyui_dir / "main.py").read_text() == "VERSION = 1\n"


def test_a_pinned_environment_is_never_evicted(origins: Origins, tmp_path: Path) -> None:
    envs = origins.environments(tmp_path)
    used = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    other = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v2))
    _age(used.root, 3600)  # the least recently used, but a ComfyUI child runs in it
    with envs.pin(used.key):
        assert {i.key: i.pinned for i in envs.ls()} == {used.key: True, other.key: False}
        result = envs.gc(max_count=1)
        assert result.kept_pinned == [used.key]
        assert result.evicted == [other.key]
        assert (used.root / "READY").exists()
    assert envs.gc(max_count=1).evicted == []  # one left: within the count


def test_prepare_evicts_beyond_max_count_after_a_build(origins: Origins, tmp_path: Path) -> None:
    envs = origins.environments(tmp_path, max_count=1)
    first = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    second = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v2))
    assert not first.root.exists()
    assert [i.key for i in envs.ls()] == [second.key]


def test_gc_removes_dead_builds_but_not_running_ones(origins: Origins, tmp_path: Path) -> None:
    envs = origins.environments(tmp_path)
    dead = tmp_path / "cache" / "envs" / ("a" * 24)
    (dead / "ComfyUI").mkdir(parents=True)
    building = tmp_path / "cache" / "envs" / ("b" * 24)
    (building / "ComfyUI").mkdir(parents=True)
    with envs.pin("b" * 24):  # a build holds its pin while it runs
        states = {i.key: (i.ready, i.pinned) for i in envs.ls()}
        assert states == {"a" * 24: (False, False), "b" * 24: (False, True)}
        result = envs.gc(max_count=5)
    assert result.removed_incomplete == ["a" * 24]
    assert not dead.exists() and building.exists()


def test_a_gc_racing_prepares_never_removes_a_pinned_environment(
    origins: Origins, tmp_path: Path
) -> None:
    specs = [EnvironmentSpec(COMFY, origins.comfy_v1), EnvironmentSpec(COMFY, origins.comfy_v2)]
    envs = origins.environments(tmp_path)
    other = origins.environments(tmp_path)  # another worker's, gc-ing over and over
    missing = []
    with RepeatedGc(lambda: other.gc(max_count=1).evicted) as gc:
        for spec in specs * 6:
            with envs.pin(spec.key):
                env = envs.prepare(spec)  # rebuilt if the gc took it while unpinned
                _age(env.root, 3600)  # the first candidate, were it not pinned
                gc.wait_rounds()  # whole rounds while this one is in use
                if not (env.comfyui_dir / "main.py").is_file():
                    missing.append(spec.key)
    assert missing == []
    assert gc.results  # the gc did remove the environment not in use, again and again


# ---------------------------------------------------------------------------- submodules

SUB = "https://git.example/acme/ComfyUI-Sub"


def _node_with_submodule(root: Path, url: str) -> tuple[Path, str, Path, str]:
    """A node repository recording a submodule at ``vendor/sub`` (``url`` in .gitmodules);
    returns the node repo, its commit, the submodule repo and the commit recorded."""
    sub = make_repo(root / "origins" / "ComfyUI-Sub")
    recorded = commit(sub, {"lib.py": "RECORDED = True\n"})
    commit(sub, {"lib.py": "RECORDED = False\n"})  # newer, but not what the node records
    node = make_repo(root / "origins" / "ComfyUI-Bar")
    (node / ".gitmodules").write_text(
        f'[submodule "sub"]\n\tpath = vendor/sub\n\turl = {url}\n')
    (node / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    git(node, "add", ".gitmodules", "__init__.py")
    # The gitlink alone, as `git submodule add` records it (without cloning anything).
    git(node, "update-index", "--add", "--cacheinfo", f"160000,{recorded},vendor/sub")
    git(node, "commit", "--quiet", "-m", "add submodule")
    return node, git(node, "rev-parse", "HEAD"), sub, recorded


def test_submodules_are_checked_out_at_the_recorded_commits(tmp_path: Path) -> None:
    comfy = make_repo(tmp_path / "origins" / "ComfyUI")
    comfy_v1 = commit(comfy, {"main.py": "VERSION = 1\n"})
    node_origin = "https://git.example/acme/ComfyUI-Bar"
    node, node_commit, sub, recorded = _node_with_submodule(tmp_path, "../ComfyUI-Sub.git")
    mirrors = GitMirrors(tmp_path / "cache" / "git",
                         {COMFY: comfy, node_origin: node, SUB: sub})
    envs = Environments(tmp_path / "cache" / "envs", mirrors)
    env = envs.prepare(EnvironmentSpec(COMFY, comfy_v1,
                                       (NodePin("ComfyUI-Bar", node_origin, node_commit),)))
    checkout = env.custom_nodes_dir / "ComfyUI-Bar" / "vendor" / "sub"
    assert (checkout / "lib.py").read_text() == "RECORDED = True\n"
    assert git(checkout, "rev-parse", "HEAD") == recorded


@pytest.mark.parametrize("url", ["file:///etc", "ssh://git.internal/repo.git"])
def test_a_submodule_outside_https_is_refused(tmp_path: Path, url: str) -> None:
    node_origin = "https://git.example/acme/ComfyUI-Bar"
    node, node_commit, _, _ = _node_with_submodule(tmp_path, url)
    mirrors = GitMirrors(tmp_path / "cache" / "git", {node_origin: node})
    with pytest.raises(OriginRefused, match="not https"):
        mirrors.checkout(node_origin, node_commit, tmp_path / "checkout")


def _within(seconds: float, call) -> BaseException | None:
    """Run ``call`` on a thread; the exception it raised, or fail if still waiting."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0]


def test_a_canceled_run_stops_waiting_for_another_workers_build(
    origins: Origins, tmp_path: Path
) -> None:
    from filelock import FileLock

    envs = origins.environments(tmp_path)
    spec = EnvironmentSpec(COMFY, origins.comfy_v1)
    envs.root.mkdir(parents=True, exist_ok=True)
    # Another worker is building this environment (or fetching its mirror) for minutes.
    with FileLock(str(envs.root / f"{spec.key}.lock")):
        assert isinstance(_within(10, lambda: envs.prepare(spec, cancel=lambda: True)),
                          BuildCanceled)
    mirrors = origins.mirrors(tmp_path)
    mirror = mirrors.mirror_path(COMFY)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(mirror) + ".lock"):
        assert isinstance(_within(10, lambda: mirrors.ensure_commit(
            COMFY, origins.comfy_v1, cancel=lambda: True)), BuildCanceled)
        assert isinstance(_within(10, lambda: mirrors.checkout(
            COMFY, origins.comfy_v1, tmp_path / "co", cancel=lambda: True)), BuildCanceled)
    # Not canceled, it waits and builds once the lock is free.
    assert envs.prepare(spec).comfyui_dir.is_dir()


def test_a_commands_output_is_kept_to_its_end_and_as_text(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # pip's and install.py's output is what their code prints: never all of it in memory.
    from runflow_worker.cache import commands as commands_module
    from runflow_worker.cache.commands import run_command

    monkeypatch.setattr(commands_module, "OUTPUT_KEEP_BYTES", 1000)
    script = ("import sys; sys.stdout.write('x' * 50000 + 'END'); "
              "sys.stderr.buffer.write(b'\\xff' * 3000 + b' last words')")
    result = run_command([sys.executable, "-c", script], cwd=tmp_path)
    assert result.stdout == "[49003 bytes cut]\n" + "x" * 997 + "END"
    assert result.stderr.startswith("[2011 bytes cut]\n\ufffd")
    assert result.stderr.endswith(" last words") and len(result.stderr) < 1100
    assert result.error_tail.endswith(" last words")
