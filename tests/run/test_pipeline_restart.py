"""A warm ComfyUI child that dies after the environment phase, while the run's models and
inputs download, is restarted before the graph executes: the run succeeds (a cold start)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.runtime.errors import RunnerStartCanceled, RunnerStartFailed
from runflow_worker.runtime.runner import RunnerConfig
from runflow_worker.runtime.supervisor import RunnerLease, RunnerSupervisor
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import copy_fetch
from tests.support.factories import message
from tests.support.pipelines import make_pipeline

pytestmark = pytest.mark.timeout(60)

GRAPH = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
         "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "read": True,
                                                     "output_id": "copy"}}}


class Supervisor(RunnerSupervisor):
    """Records each ``acquire`` call's duration; ``on_restart`` replaces the second."""

    def __init__(self, on_restart: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.ready = threading.Event()
        self.durations: list[float] = []
        self.on_restart = on_restart

    def acquire(self, config: RunnerConfig, *, owner: str | None = None,
                should_stop: Callable[[], bool] | None = None) -> RunnerLease:
        if self.durations and self.on_restart is not None:
            self.on_restart()
        start = time.monotonic()
        lease = super().acquire(config, owner=owner, should_stop=should_stop)
        self.durations.append(time.monotonic() - start)
        self.ready.set()
        return lease


class Setup:
    def __init__(self, root: Path, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.killed: list[int] = []
        self.src = root / "doc.txt"
        self.src.write_text("fetched after a restart")
        self.pipeline = make_pipeline(root, allow_local_files=True, supervisor=supervisor,
                                      fetch_input=self.fetch)

    def fetch(self, url: str, dest: Path, *, max_bytes: int, cancel: object) -> None:
        """The input download; the first one kills the idle child once it is READY."""
        if not self.killed:
            assert self.supervisor.ready.wait(30), "the environment phase never ended"
            runner = self.supervisor.runner
            assert runner is not None and runner.pid is not None and runner._proc is not None
            self.killed.append(runner.pid)
            os.kill(runner.pid, signal.SIGKILL)  # the OOM killer, while the child idles
            assert wait([runner._proc.sentinel], timeout=30), "the child did not die"
        copy_fetch(url, dest, max_bytes=max_bytes, cancel=cancel)

    def run(self, run_id: str, control: RecordingControl | None = None):
        msg = message(GRAPH, run_id=run_id, input={"doc": self.src.as_uri()})
        return self.pipeline.execute(parse_message(msg), control or RecordingControl())


@pytest.fixture
def make(tmp_path: Path):
    made: list[Setup] = []

    def build(on_restart: Callable[[], None] | None = None) -> Setup:
        made.append(Setup(tmp_path, Supervisor(on_restart)))
        return made[-1]

    yield build
    for setup in made:
        setup.pipeline.close()


def test_a_child_dead_before_execute_is_restarted_and_the_run_succeeds(make) -> None:
    setup = make()
    result = setup.run("restart-1")
    assert result.status is RunStatus.SUCCEEDED, result.failure
    (entry,) = result.output.outputs
    assert Path(unquote(urlsplit(entry.url).path)).read_text() == "fetched after a restart"
    runner = setup.supervisor.runner
    assert runner is not None and runner.pid != setup.killed[0]
    assert setup.supervisor.restarts == 1 and len(setup.supervisor.durations) == 2
    # Both starts are the run's cold start: the first one and the restart.
    assert result.cold_start_s >= sum(setup.supervisor.durations)
    assert "exit code -9 (SIGKILL)" in (runner.last_exit or "")
    warm = setup.run("restart-2")
    assert warm.status is RunStatus.SUCCEEDED and warm.cold_start_s == 0


def test_a_failed_restart_is_an_environment_failure(make) -> None:
    def fail() -> None:
        raise RunnerStartFailed("fake init failure", "Traceback: fake")

    result = make(fail).run("restart-failed")
    assert result.status is RunStatus.FAILED
    assert result.failure.code is ErrorCode.ENVIRONMENT_FAILED
    assert "ComfyUI failed to start: fake init failure" in result.failure.message


def test_a_restart_canceled_ends_the_run_canceled(make) -> None:
    control = RecordingControl()

    def cancel() -> None:  # the cancel lands while ComfyUI starts again
        control.cancel.set()
        raise RunnerStartCanceled("ComfyUI start was interrupted")

    result = make(cancel).run("restart-canceled", control)
    assert result.status is RunStatus.CANCELED
    assert result.failure.code is ErrorCode.CANCELED
