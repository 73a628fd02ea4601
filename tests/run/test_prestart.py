"""``serve`` starts the ComfyUI child before its first run (``Pipeline.prestart``): the run
finds it READY or STARTING, bills only its wait, and the owner rules hold for it."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

from runflow_worker.cache.environments import Environment, Environments
from runflow_worker.cache.git import GitMirrors
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline
from runflow_worker.runtime.runner import RunnerState
from runflow_worker.runtime.supervisor import RunnerSupervisor
from tests.fakes import FAIL_START_CHILD, GATED_START_CHILD
from tests.fakes.control import RecordingControl
from tests.support.factories import message, workflow
from tests.support.pipelines import checkout_pipeline, make_pipeline
from tests.support.runners import gone, runner_config

pytestmark = pytest.mark.timeout(60)


def run_as(pipeline: Pipeline, owner: str | None, run_id: str):
    return pipeline.execute(parse_message(message(wf=workflow(owner=owner), run_id=run_id)),
                            RecordingControl())


# ------------------------------------------------------------------ through the pipeline


def test_the_first_run_uses_the_ready_prestarted_child(tmp_path: Path) -> None:
    pipeline = checkout_pipeline(tmp_path, with_nodes=True)
    try:
        starting = pipeline.prestart()
        assert starting is not None and starting.result(timeout=30) is True
        runner = pipeline.supervisor.runner
        assert runner is not None and runner.state is RunnerState.READY
        pid = runner.pid
        assert pid is not None  # the child exists before any run was handed over
        result = run_as(pipeline, "acme", "pre-1")
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert pipeline.supervisor.runner.pid == pid
        assert result.cold_start_s == 0  # it waited for no child
        # The child loaded custom nodes and served acme: it is acme's now.
        other = run_as(pipeline, "globex", "pre-2")
        assert other.status is RunStatus.SUCCEEDED and other.cold_start_s > 0
        assert pipeline.supervisor.runner.pid != pid and gone(pid)
    finally:
        pipeline.close()


def test_a_run_that_arrives_while_the_child_starts_bills_its_wait(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, child_entry=GATED_START_CHILD, startup_timeout_s=30)
    try:
        starting = pipeline.prestart()
        assert starting is not None
        assert pipeline.supervisor.prestart_began.wait(10)
        runner = pipeline.supervisor.runner
        assert runner is not None and runner.spawned.wait(10)
        pid = runner.pid  # the child exists (gated before Ready) before the run is handed over
        assert pid is not None
        results = []
        runner_thread = threading.Thread(
            target=lambda: results.append(run_as(pipeline, "acme", "pre-wait")))
        run_began = time.monotonic()
        runner_thread.start()
        assert pipeline.supervisor.prestart_awaited.wait(10)  # the run waits for the child
        (tmp_path / "gate").touch()
        assert starting.result(timeout=30) is True
        runner_thread.join(30)
        waited_at_most = time.monotonic() - run_began
        [result] = results
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert pipeline.supervisor.runner.pid == pid  # no second child
        assert 0 < result.cold_start_s <= waited_at_most
    finally:
        pipeline.close()


def test_a_failed_prestart_does_not_fail_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "fail-start"
    marker.touch()
    pipeline = make_pipeline(tmp_path, child_entry=FAIL_START_CHILD, startup_timeout_s=30)
    try:
        starting = pipeline.prestart()
        assert starting is not None and starting.result(timeout=30) is False
        assert pipeline.supervisor.runner is None and pipeline.supervisor.restarts == 0
        marker.unlink()  # the run's own start succeeds
        result = run_as(pipeline, "acme", "pre-fail")
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert result.unfit is None and result.cold_start_s > 0
    finally:
        pipeline.close()


def test_no_prestart_without_a_checkout_or_environment(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, comfyui_dir=None)
    try:
        assert pipeline.prestart() is None
    finally:
        pipeline.close()


def test_close_cancels_a_prestart_in_progress(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, child_entry=GATED_START_CHILD, startup_timeout_s=30)
    starting = pipeline.prestart()
    assert starting is not None
    pipeline.close()  # the gate never opens: the start is canceled, not waited out
    assert starting.result(timeout=10) is False
    assert pipeline.supervisor.runner is None


# ------------------------------------------------------------------ owner rules


def test_prestarted_child_with_custom_code_binds_to_its_first_owner(
        sup: RunnerSupervisor, tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    assert sup.prestart(cfg)
    pid = sup.runner.pid
    first = sup.acquire(cfg, owner="alice")  # any owner may take an unbound child
    assert not first.started and first.runner.pid == pid
    assert sup.acquire(cfg, owner="alice").runner.pid == pid
    other = sup.acquire(cfg, owner="bob")  # never another owner's afterwards
    assert other.started and other.runner.pid != pid and gone(pid)


def test_prestarted_child_with_custom_code_binds_to_no_owner_too(
        sup: RunnerSupervisor, tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    assert sup.prestart(cfg)
    pid = sup.runner.pid
    assert sup.acquire(cfg, owner=None).runner.pid == pid
    named = sup.acquire(cfg, owner="alice")
    assert named.started and named.runner.pid != pid


def test_prestarted_child_without_custom_code_is_shared(sup: RunnerSupervisor,
                                                        tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=False)
    assert sup.prestart(cfg)
    pid = sup.runner.pid
    for owner in ("alice", "bob", None):
        lease = sup.acquire(cfg, owner=owner)
        assert not lease.started and lease.runner.pid == pid


def test_a_run_for_another_environment_cancels_the_prestart(sup: RunnerSupervisor,
                                                            tmp_path: Path) -> None:
    gated_dir = tmp_path / "gated"
    gated_dir.mkdir()
    done = threading.Event()
    outcome = []

    def prestart() -> None:
        outcome.append(sup.prestart(runner_config(gated_dir, custom_code=False,
                                                  entry=GATED_START_CHILD)))
        done.set()

    thread = threading.Thread(target=prestart)
    thread.start()
    try:
        # The gate never opens: the run would wait the whole startup timeout were the
        # pre-start of the wrong environment not canceled.
        lease = sup.acquire(runner_config(tmp_path, custom_code=False), owner="alice")
        assert lease.started and lease.runner.state is RunnerState.READY
        assert done.wait(10) and outcome == [False]
    finally:
        thread.join(10)


def test_prestart_after_a_child_exists_does_nothing(sup: RunnerSupervisor,
                                                    tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    pid = sup.acquire(cfg, owner="alice").runner.pid
    assert sup.prestart(cfg) is False
    assert sup.runner.pid == pid and sup.tenant == ("owner", "alice")


# ------------------------------------------------------------------ on the volume


def _env_dir(root: Path, key: str, mtime: float, *, ready: bool = True) -> Path:
    env_dir = root / key
    (env_dir / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    (env_dir / "python").mkdir()
    if ready:
        (env_dir / "READY").write_text("")
        os.utime(env_dir / "READY", (mtime, mtime))
    os.utime(env_dir, (mtime, mtime))
    return env_dir


def test_most_recent_is_the_last_used_complete_environment(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    _env_dir(root, "a" * 24, 1_000)
    newer = _env_dir(root, "b" * 24, 2_000)
    _env_dir(root, "c" * 24, 3_000, ready=False)  # a build in progress: not a candidate
    envs = Environments(root, GitMirrors(tmp_path / "git", {}))
    env = envs.most_recent()
    assert env is not None and env.key == "b" * 24 and env.comfyui_dir == newer / "ComfyUI"
    assert os.stat(newer / "READY").st_mtime == 2_000  # its last use is not touched
    assert Environments(tmp_path / "none", GitMirrors(tmp_path / "git", {})).most_recent() is None


class _OneEnvironment:
    """An environment builder with one prepared environment (every spec gets it)."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.pinned: list[str] = []

    def most_recent(self) -> Environment:
        return self.env

    def prepare(self, spec: object, *, cancel: object = None) -> Environment:
        return self.env

    def pin(self, key: str) -> contextlib.AbstractContextManager[None]:
        self.pinned.append(key)
        return contextlib.nullcontext()


def test_without_a_checkout_the_most_recent_environment_is_prestarted(tmp_path: Path) -> None:
    env_dir = _env_dir(tmp_path / "envs", "d" * 24, 1_000)
    env = Environment("d" * 24, env_dir, env_dir / "ComfyUI", ())
    builder = _OneEnvironment(env)
    pipeline = make_pipeline(tmp_path, comfyui_dir=None, environments=builder)
    try:
        starting = pipeline.prestart()
        assert starting is not None and starting.result(timeout=30) is True
        assert builder.pinned == [env.key]  # kept from gc while its child runs
        pid = pipeline.supervisor.runner.pid
        result = run_as(pipeline, "acme", "env-1")
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert pipeline.supervisor.runner.pid == pid and result.cold_start_s == 0
        assert result.environment["env_key"] == env.key
    finally:
        pipeline.close()
