"""The runner's supervision with real ComfyUI in the child: plain data over the pipe, a
child dead while idle, the scrubbed environment and the child's JSON log lines."""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import wait
from pathlib import Path

import pytest

from runflow_worker.cache.commands import OPENMP_WAIT_NAMES
from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.runner import Runner, RunnerConfig, RunnerState
from tests.comfyui.scenario import COMFY, HERE, img_graph, run, write_png

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]


def test_validation_error_with_a_packs_own_objects_is_readable(pipeline) -> None:
    graph = {"1": {"class_type": "RunflowRunnerTestMarkedInt", "inputs": {"value": 99}}}
    result = run(pipeline, graph, {}, run_id="pack-objects")
    f = result.failure
    assert f is not None and f.code is ErrorCode.INVALID_WORKFLOW, f
    assert (f.node_id, f.node_type) == ("1", "RunflowRunnerTestMarkedInt")
    (error,) = f.details["errors"]
    assert error["type"] == "value_bigger_than_max"
    assert error["extra_info"]["input_config"] == [
        "INT", {"default": 1, "min": 0, "max": 5, "marker": "<pack-only marker>"}]
    runner = pipeline.supervisor.runner
    assert runner.state is RunnerState.READY  # the child stays warm


def test_child_dead_while_idle_then_a_good_run(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "RunflowOutputImage", "inputs": {
        "output_id": "o", "output_name": "", "value": ["1", 0]}}})
    image = write_png(tmp_path / "i.png").as_uri()
    assert run(pipeline, graph, {"image": image}, run_id="warm").status is RunStatus.SUCCEEDED
    runner = pipeline.supervisor.runner
    pid, restarts = runner.pid, pipeline.supervisor.restarts
    os.kill(pid, signal.SIGKILL)  # the OOM killer, while no run is in progress
    assert wait([runner._proc.sentinel], timeout=60)
    ok = run(pipeline, graph, {"image": image}, run_id="after-idle-death")
    assert ok.status is RunStatus.SUCCEEDED, ok.failure
    assert pipeline.supervisor.runner.pid != pid
    assert pipeline.supervisor.restarts == restarts + 1
    assert "SIGKILL" in (pipeline.supervisor.runner.last_exit or "")


def test_child_environment_and_log_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", "whsec_notforthechild")
    monkeypatch.setenv("HF_TOKEN", "hf_passed")
    for name in OPENMP_WAIT_NAMES:
        monkeypatch.delenv(name, raising=False)
    for d in ("in", "out", "tmp", "base"):
        (tmp_path / d).mkdir()
    runner = Runner(RunnerConfig(
        comfyui_dir=COMFY, base_dir=str(tmp_path / "base"), cpu=True,
        custom_node_dirs=(str(HERE / "custom_nodes"),), env_pass=("HF_TOKEN",),
        child_entry="runflow_worker.runtime.child:main", startup_timeout_s=600))
    try:
        with caplog.at_level(logging.INFO, logger="runflow.comfyui"):
            runner.start()
            environ = Path(f"/proc/{runner.pid}/environ").read_bytes().decode()
            assert "aws-secret-value" not in environ and "whsec_" not in environ
            assert "HF_TOKEN=hf_passed\0" in environ
            # torch's OpenMP threads sleep when idle instead of spinning for ms after a run.
            assert "OMP_WAIT_POLICY=PASSIVE" in environ.split("\0")
            graph = {"1": {"class_type": "EmptyImage", "inputs": {
                         "width": 8, "height": 8, "batch_size": 1, "color": 0}},
                     "2": {"class_type": "RunflowTestRaise", "inputs": {"image": ["1", 0]}},
                     "3": {"class_type": "SaveImage", "inputs": {
                         "images": ["2", 0], "filename_prefix": "x"}}}
            out = runner.execute(p.Execute("real-run:1:5", graph, str(tmp_path / "in"),
                                           str(tmp_path / "out"), str(tmp_path / "tmp")))
            assert isinstance(out, p.Failed) and out.kind is p.FailureKind.NODE_ERROR
            relay = runner._proc.output
            runner.stop()
            assert relay.join(timeout_s=30), "the output thread outlived the child"
    finally:
        runner.stop()
    # The child's lines are the worker's records of runflow.comfyui, tagged with the run
    # the worker ran; nothing of the child reaches the worker's stderr directly.
    child = [r for r in caplog.records if r.name == "runflow.comfyui"]
    errors = [r for r in child if getattr(r, "run_id", None) == "real-run"]
    assert any(r.getMessage().startswith("!!! Exception during processing !!!")
               for r in errors), [r.getMessage() for r in child]
    assert any("Traceback (most recent call last)" in r.getMessage()
               and "test node exploded" in r.getMessage() for r in errors)
    assert all(r.origin == "comfyui" for r in child)
    err = capfd.readouterr().err
    assert "test node exploded" not in err
