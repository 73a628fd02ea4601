"""Runs without a baked ComfyUI checkout: each gets the environment its workflow pins."""

from __future__ import annotations

import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.cache.commands import run_command
from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.errors import OriginRefused
from runflow_worker.cache.git import GitMirrors
from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline
from tests.fakes.control import RecordingControl
from tests.support.factories import message, workflow
from tests.support.gitrepos import COMFY, NODE, commit, make_repo
from tests.support.pipelines import make_pipeline

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def origins(tmp_path: Path) -> dict[str, Any]:
    comfy = make_repo(tmp_path / "origins" / "ComfyUI")
    node = make_repo(tmp_path / "origins" / "ComfyUI-Foo")
    return {
        "comfy": comfy, "node": node,
        "v1": commit(comfy, {"main.py": "1\n"}), "v2": commit(comfy, {"main.py": "2\n"}),
        "node_v1": commit(node, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"}),
    }


@pytest.fixture
def pipeline(tmp_path: Path, origins: dict[str, Any]):
    envs = Environments(tmp_path / "cache" / "envs",
                        GitMirrors(tmp_path / "cache" / "git",
                                   {COMFY: origins["comfy"], NODE: origins["node"]}))
    pl = make_pipeline(tmp_path, comfyui_dir=None, environments=envs)
    yield pl
    pl.close()


def _message(comfy_commit: str, nodes: dict[str, Any] | None = None, run_id: str = "env-1"):
    wf = workflow()
    wf["environment"]["comfyui"] = {"origin": COMFY, "commit": comfy_commit, "dirty": False}
    wf["custom_nodes"] = nodes or {}
    return parse_message(message(wf=wf, run_id=run_id))


def test_run_gets_its_pinned_environment_and_reuses_it(
    pipeline: Pipeline, origins: dict[str, Any], tmp_path: Path
) -> None:
    nodes = {"ComfyUI-Foo": {"origin": NODE, "commit": origins["node_v1"], "dirty": False}}
    result = pipeline.execute(_message(origins["v1"], nodes), RecordingControl())
    assert result.status is RunStatus.SUCCEEDED, result.failure
    key = EnvironmentSpec(COMFY, origins["v1"],
                          (NodePin("ComfyUI-Foo", NODE, origins["node_v1"]),)).key
    assert result.environment["env_key"] == key
    # The checkout's commit as the worker reads it, not the child's word (the fake says 0s).
    assert result.environment["comfyui_commit"] == origins["v1"]
    runner = pipeline.supervisor.runner
    env_dir = tmp_path / "cache" / "envs" / key
    assert runner.config.comfyui_dir == str(env_dir / "ComfyUI")
    assert (env_dir / "ComfyUI" / "custom_nodes" / "ComfyUI-Foo" / "__init__.py").exists()
    assert not any("custom node" in w for w in result.warnings)
    again = pipeline.execute(_message(origins["v1"], nodes, run_id="env-2"), RecordingControl())
    assert again.status is RunStatus.SUCCEEDED
    assert pipeline.supervisor.runner is runner  # same environment: the warm child stays
    assert again.cold_start_s == 0


def test_another_pin_switches_environment(pipeline: Pipeline, origins: dict[str, Any]) -> None:
    first = pipeline.execute(_message(origins["v1"]), RecordingControl())
    runner = pipeline.supervisor.runner
    second = pipeline.execute(_message(origins["v2"], run_id="env-2"), RecordingControl())
    assert first.status is second.status is RunStatus.SUCCEEDED
    assert first.environment["env_key"] != second.environment["env_key"]
    assert pipeline.supervisor.runner is not runner
    assert pipeline.supervisor.runner.config.comfyui_dir.endswith("/ComfyUI")
    assert second.cold_start_s > 0


def test_unbuildable_environment_fails_the_run(pipeline: Pipeline) -> None:
    result = pipeline.execute(_message("1" * 40), RecordingControl())
    assert result.status is RunStatus.FAILED
    assert result.failure.code is ErrorCode.ENVIRONMENT_FAILED
    assert "not found" in result.failure.message
    assert result.failure.details["env_key"] == EnvironmentSpec(COMFY, "1" * 40).key


class _SlowBuilder:
    """An environment build that runs a long command (as pip or git fetch may)."""

    def pin(self, key: str) -> Any:
        return nullcontext()

    def prepare(self, spec: Any, *, cancel: Any = None) -> Any:
        run_command(["sleep", "30"], cancel=cancel)
        raise AssertionError("not canceled")


def test_cancel_during_the_build(tmp_path: Path, origins: dict[str, Any]) -> None:
    pl = make_pipeline(tmp_path, comfyui_dir=None, environments=_SlowBuilder())
    control = RecordingControl()
    threading.Timer(0.3, control.cancel.set).start()
    started = time.monotonic()
    try:
        result = pl.execute(_message(origins["v1"]), control)
    finally:
        pl.close()
    assert result.status is RunStatus.CANCELED
    assert time.monotonic() - started < 0.3 + 2.0


def test_the_warm_environment_is_pinned_until_the_child_leaves_it(
    tmp_path: Path, origins: dict[str, Any]
) -> None:
    def environments() -> Environments:  # this worker's, or another's on the same volume
        return Environments(tmp_path / "cache" / "envs",
                            GitMirrors(tmp_path / "cache" / "git", {COMFY: origins["comfy"]}))

    pl = make_pipeline(tmp_path, comfyui_dir=None, environments=environments())
    other = environments()
    try:
        first = pl.execute(_message(origins["v1"]), RecordingControl())
        assert first.status is RunStatus.SUCCEEDED, first.failure
        one = first.environment["env_key"]
        two = other.prepare(EnvironmentSpec(COMFY, origins["v2"])).key
        stamp = time.time() - 3600  # make the one in use the least recently used
        os.utime(tmp_path / "cache" / "envs" / one / "READY", (stamp, stamp))
        # Another worker's gc keeps the environment the warm child runs in.
        result = other.gc(max_count=1)
        assert result.kept_pinned == [one] and result.evicted == [two]
        assert (tmp_path / "cache" / "envs" / one / "READY").exists()

        second = pl.execute(_message(origins["v2"], run_id="env-2"), RecordingControl())
        assert second.status is RunStatus.SUCCEEDED, second.failure
        assert second.environment["env_key"] == two  # built again after the gc took it
        # The child left the first environment: it is a candidate now; the second is not.
        assert {i.key: i.pinned for i in other.ls()} == {one: False, two: True}
        assert other.gc(max_count=1).evicted == [one]
    finally:
        pl.close()
    assert not any(i.pinned for i in other.ls())  # closing the worker lets go of all


class _RefusingBuilder:
    """An environment whose origin the URL policy refuses (e.g. it resolves to 10.0.0.5)."""

    def pin(self, key: str) -> Any:
        return nullcontext()

    def prepare(self, spec: Any, *, cancel: Any = None) -> Any:
        raise OriginRefused(f"git origin {spec.comfyui_origin}: refused: internal address")


def test_a_refused_origin_fails_the_run_as_forbidden(
    tmp_path: Path, origins: dict[str, Any]
) -> None:
    pl = make_pipeline(tmp_path, comfyui_dir=None, environments=_RefusingBuilder())
    try:
        result = pl.execute(_message(origins["v1"]), RecordingControl())
    finally:
        pl.close()
    assert result.status is RunStatus.FAILED
    assert result.failure.code is ErrorCode.FORBIDDEN_ORIGIN
    assert "internal address" in result.failure.message
    assert result.failure.details["env_key"] == EnvironmentSpec(COMFY, origins["v1"]).key


def test_install_scripts_run_when_the_operator_turns_them_on(
    tmp_path: Path, origins: dict[str, Any]
) -> None:
    with_script = commit(origins["node"], {"install.py": "open('ran.txt', 'w').close()\n"})
    nodes = {"ComfyUI-Foo": {"origin": NODE, "commit": with_script, "dirty": False}}
    envs = Environments(tmp_path / "cache" / "envs",
                        GitMirrors(tmp_path / "cache" / "git",
                                   {COMFY: origins["comfy"], NODE: origins["node"]}))
    pl = make_pipeline(tmp_path, comfyui_dir=None, run_install_scripts=True, environments=envs)
    try:
        result = pl.execute(_message(origins["v1"], nodes), RecordingControl())
    finally:
        pl.close()
    assert result.status is RunStatus.SUCCEEDED, result.failure
    key = EnvironmentSpec(COMFY, origins["v1"], (NodePin("ComfyUI-Foo", NODE, with_script),),
                          install_scripts=True).key
    assert result.environment["env_key"] == key
    node_dir = tmp_path / "cache" / "envs" / key / "ComfyUI" / "custom_nodes" / "ComfyUI-Foo"
    assert (node_dir / "ran.txt").exists()


def test_the_recorded_commit_is_the_pinned_one_never_what_a_build_left_in_git(
        pipeline: Pipeline, origins: dict[str, Any], tmp_path: Path) -> None:
    """A build's code may rewrite the checkout's ``.git``: a ref linked to a worker's file
    holding 40 hex digits (a token) would have the worker's own ``git rev-parse`` put that
    file into the run's record."""
    secret = tmp_path / "token"
    secret.write_text("0123456789abcdef" * 2 + "89abcdef\n")
    first = pipeline.execute(_message(origins["v1"]), RecordingControl())
    assert first.status is RunStatus.SUCCEEDED, first.failure
    comfy = Path(pipeline.supervisor.runner.config.comfyui_dir)
    fake = comfy.parent / "fakegit"  # what a build could leave (it writes its environment)
    (fake / "refs" / "heads").mkdir(parents=True)
    (fake / "objects").mkdir()
    (fake / "HEAD").write_text("ref: refs/heads/main\n")
    (fake / "refs" / "heads" / "main").symlink_to(secret)
    (comfy / ".git").write_text(f"gitdir: {fake}\n")
    other = make_pipeline(tmp_path, work_dir=tmp_path / "work2", comfyui_dir=None,
                          environments=pipeline.environments)
    try:
        again = other.execute(_message(origins["v1"], run_id="env-2"), RecordingControl())
    finally:
        other.close()
    assert again.status is RunStatus.SUCCEEDED, again.failure
    assert again.environment["comfyui_commit"] == origins["v1"]
