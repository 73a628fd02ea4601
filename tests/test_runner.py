"""The runner's state machine and protocol, against a fake child speaking the real protocol."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from runtime import protocol as p
from runtime.errors import RunnerStartFailed, RunnerStateError
from runtime.runner import Runner, RunnerConfig, RunnerState, RunnerSupervisor, describe_exit

FAKE = "tests.fakes.fake_child:main"


def config(tmp_path: Path, **env: str) -> RunnerConfig:
    return RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path / "base"),
                        child_entry=FAKE, startup_timeout_s=60, env=dict(env))


def job(tmp_path: Path, graph: dict, job_id: str = "j1") -> p.Execute:
    for d in ("in", "out", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    return p.Execute(job_id=job_id, graph=graph, input_dir=str(tmp_path / "in"),
                     output_dir=str(tmp_path / "out"), temp_dir=str(tmp_path / "tmp"))


SAVE = {"1": {"class_type": "FakeSave", "inputs": {"text": "hi", "output_id": "o"}}}


@pytest.fixture
def runner(tmp_path: Path):
    r = Runner(config(tmp_path))
    yield r
    r.stop()


def test_lifecycle_and_state_checks(runner: Runner, tmp_path: Path) -> None:
    assert runner.state is RunnerState.NEW
    with pytest.raises(RunnerStateError):
        runner.execute(job(tmp_path, SAVE))
    ready = runner.start()
    assert isinstance(ready, p.Ready) and runner.state is RunnerState.READY
    with pytest.raises(RunnerStateError):
        runner.start()
    events: list[p.JobEvent] = []
    done = runner.execute(job(tmp_path, SAVE), on_event=events.append)
    assert isinstance(done, p.Done) and runner.state is RunnerState.READY
    assert done.outputs[0].relpath == "o_00001_.txt"
    assert (tmp_path / "out" / "o_00001_.txt").read_text() == "hi"
    assert [type(e) for e in events] == [p.NodeStarted]
    runner.stop()
    assert runner.state is RunnerState.DEFUNCT


def test_progress_events_reach_the_parent(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    events: list[p.JobEvent] = []
    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 0.3}}}
    assert isinstance(runner.execute(job(tmp_path, graph), on_event=events.append), p.Done)
    steps = [e for e in events if isinstance(e, p.Progress)]
    assert steps and steps[0].total == 30 and steps[-1].value > steps[0].value


def test_child_sigkilled_mid_run_is_a_readable_failure(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    pid = runner.pid
    started = threading.Event()

    def on_event(ev: p.JobEvent) -> None:
        if isinstance(ev, p.Progress) and not started.is_set():
            started.set()
            os.kill(pid, signal.SIGKILL)

    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 30}}}
    out = runner.execute(job(tmp_path, graph), on_event=on_event)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED
    assert "exit code -9 (SIGKILL)" in out.message and "out of memory" in out.message
    assert runner.state is RunnerState.DEFUNCT
    # The next run gets a fresh child.
    runner.start()
    assert runner.pid != pid and runner.restarts == 1
    assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)


def test_segfault_reported(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    graph = {"1": {"class_type": "FakeCrash", "inputs": {"signal": int(signal.SIGSEGV)}}}
    out = runner.execute(job(tmp_path, graph))
    assert isinstance(out, p.Failed) and "SIGSEGV" in out.message


def test_interrupt_lands_quickly(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    asked = threading.Event()
    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 30}}}
    timer = threading.Timer(0.3, asked.set)
    timer.start()
    t0 = time.monotonic()
    out = runner.execute(job(tmp_path, graph), should_interrupt=asked.is_set)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERRUPTED
    assert time.monotonic() - t0 < 0.3 + 2.0
    assert runner.state is RunnerState.READY  # the child honoured it and stays warm
    assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)


def test_child_ignoring_interrupt_is_killed(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    graph = {"1": {"class_type": "FakeBusy", "inputs": {"seconds": 60}}}
    t0 = time.monotonic()
    out = runner.execute(job(tmp_path, graph), should_interrupt=lambda: True)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERRUPTED
    assert time.monotonic() - t0 < 2.0
    assert runner.state is RunnerState.DEFUNCT


def test_failures_keep_the_child(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    pid = runner.pid
    for kind, expected in (("FakeError", p.FailureKind.NODE_ERROR),
                           ("FakeOOM", p.FailureKind.OUT_OF_MEMORY),
                           ("FakeUnknown", p.FailureKind.INVALID_WORKFLOW)):
        out = runner.execute(job(tmp_path, {"7": {"class_type": kind, "inputs": {}}}))
        assert isinstance(out, p.Failed) and out.kind is expected and out.node_id == "7"
    assert runner.pid == pid and runner.state is RunnerState.READY


def test_init_failure(tmp_path: Path) -> None:
    r = Runner(config(tmp_path, fake_init_fail="1"))
    with pytest.raises(RunnerStartFailed) as info:
        r.start()
    assert "fake init failure" in str(info.value)
    assert r.state is RunnerState.DEFUNCT


def test_startup_timeout(tmp_path: Path) -> None:
    cfg = RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path), child_entry=FAKE,
                       startup_timeout_s=0.5, env={"fake_init_delay_s": "30"})
    r = Runner(cfg)
    with pytest.raises(RunnerStartFailed, match="did not start"):
        r.start()
    assert r.state is RunnerState.DEFUNCT


def test_supervisor_restarts_dead_and_switches_environment(tmp_path: Path) -> None:
    sup = RunnerSupervisor()
    try:
        a = sup.runner_for(config(tmp_path))
        pid = a.pid
        assert sup.runner_for(config(tmp_path)).pid == pid  # warm
        os.kill(pid, signal.SIGKILL)
        out = a.execute(job(tmp_path, SAVE))
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED
        b = sup.runner_for(config(tmp_path))
        assert b.pid != pid and b.state is RunnerState.READY
        other = RunnerConfig(**{**config(tmp_path).__dict__, "env_key": "other"})
        c = sup.runner_for(other)
        assert c is not b and b.state is RunnerState.DEFUNCT
    finally:
        sup.close()


def test_describe_exit() -> None:
    assert describe_exit(1) == "exit code 1"
    assert "SIGSEGV" in describe_exit(-11)


def test_start_can_be_interrupted(tmp_path: Path) -> None:
    from runtime.errors import RunnerStartCanceled

    r = Runner(config(tmp_path, fake_init_delay_s="60"))
    asked = threading.Event()
    threading.Timer(0.3, asked.set).start()
    t0 = time.monotonic()
    with pytest.raises(RunnerStartCanceled):
        r.start(should_stop=asked.is_set)
    assert time.monotonic() - t0 < 0.3 + 2.0
    assert r.state is RunnerState.DEFUNCT and r.pid is None
