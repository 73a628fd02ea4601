"""The run pipeline end to end with a fake ComfyUI child: every outcome is one result."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from runflow_worker.cache.errors import FetchConnectError
from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline, StopReason
from runflow_worker.run.record import terminal_record
from runflow_worker.run.storage import LocalStorage
from tests.fakes import GATED_START_CHILD, SLOW_START_CHILD
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import copy_fetch
from tests.support.factories import message, workflow
from tests.support.pipelines import make_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline")
    pl = make_pipeline(root, allow_local_files=True, fetch_input=copy_fetch)
    yield pl
    pl.close()


def run(pipeline: Pipeline, msg: dict, control: RecordingControl | None = None):
    return pipeline.execute(parse_message(msg), control or RecordingControl())


def test_success_outputs_and_isolation(pipeline: Pipeline) -> None:
    result = run(pipeline, message(run_id="ok-1", input={"prompt": "first"}))
    assert result.status is RunStatus.SUCCEEDED, result.failure
    (entry,) = result.output.outputs
    assert entry.output_id == "out" and entry.key == "runs/ok-1/out/out_00001_.txt"
    assert Path(unquote(urlsplit(entry.url).path)).read_text() == "first"
    assert set(result.timings_ms) >= {"validate", "environment", "models", "inputs",
                                      "execute", "upload"}
    assert result.gpu_work
    # Run directories are removed after the outputs are stored (off the run's path).
    pipeline.settle()
    assert list(pipeline.config.work_dir.rglob("ok-1-*")) == []
    second = run(pipeline, message(run_id="ok-2", input={"prompt": "second"}))
    assert Path(unquote(urlsplit(second.output.outputs[0].url).path)).read_text() == "second"


def test_local_file_input(pipeline: Pipeline, tmp_path: Path) -> None:
    src = tmp_path / "note.txt"
    src.write_text("from a file")
    graph = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
             "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "read": True,
                                                         "output_id": "copy"}}}
    result = run(pipeline, message(graph, input={"doc": src.as_uri()}))
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert Path(unquote(urlsplit(result.output.outputs[0].url).path)).read_text() == "from a file"


def test_rejected_before_gpu_work_bills_zero(pipeline: Pipeline) -> None:
    msg = message(input={"prompt": 5})
    result = run(pipeline, msg)
    assert result.status is RunStatus.FAILED and not result.gpu_work
    assert result.failure.code is ErrorCode.INVALID_INPUT
    record = terminal_record(parse_message(msg), result, started_at=_now(), gpu_class="l4",
                             gpu_seconds=3.0, cold_start_s=2.0)
    assert record.billing.gpu_seconds == 0 and record.billing.attempts[0].gpu_seconds == 0
    assert record.error["details"]["fields"] == ["input.prompt"]


@pytest.mark.parametrize(("node", "code"), [("FakeError", ErrorCode.NODE_ERROR),
                                             ("FakeOOM", ErrorCode.OUT_OF_MEMORY),
                                             ("FakeUnknown", ErrorCode.INVALID_WORKFLOW)])
def test_node_failures_map_to_codes(pipeline: Pipeline, node: str, code: ErrorCode) -> None:
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
             "5": {"class_type": node, "inputs": {}}}
    result = run(pipeline, message(graph))
    assert result.status is RunStatus.FAILED and result.failure.code is code
    assert result.failure.node_id == "5" and result.failure.node_type == node
    assert result.oom == (code is ErrorCode.OUT_OF_MEMORY)


def test_child_death_is_internal_then_next_run_works(pipeline: Pipeline) -> None:
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
             "2": {"class_type": "FakeCrash", "inputs": {}}}
    result = run(pipeline, message(graph))
    assert result.failure.code is ErrorCode.INTERNAL
    assert "SIGKILL" in result.failure.message
    ok = run(pipeline, message(run_id="after-crash"))
    assert ok.status is RunStatus.SUCCEEDED and ok.cold_start_s > 0


def _sleep_graph(seconds: float) -> dict:
    return {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
            "2": {"class_type": "FakeSleep", "inputs": {"seconds": seconds}}}


def test_cancel_mid_run(pipeline: Pipeline) -> None:
    control = RecordingControl()
    first_step = threading.Event()
    original = control.emit

    def emit(kind: str, data: dict[str, Any]) -> None:
        original(kind, data)
        if "step" in data:
            first_step.set()

    control.emit = emit  # type: ignore[method-assign]
    threading.Thread(target=lambda: first_step.wait(30) and control.cancel.set()).start()
    t0 = time.monotonic()
    result = run(pipeline, message(_sleep_graph(60)), control)
    assert result.status is RunStatus.CANCELED and result.failure.code is ErrorCode.CANCELED
    assert time.monotonic() - t0 < 20
    assert any("step" in d for _, d in control.events)


def test_timeout(pipeline: Pipeline) -> None:
    result = run(pipeline, message(_sleep_graph(60), timeout_s=0.5))
    assert result.status is RunStatus.FAILED and result.failure.code is ErrorCode.TIMEOUT


def test_shutdown_releases(pipeline: Pipeline) -> None:
    control = RecordingControl()
    control.reason = StopReason.RELEASE
    threading.Timer(0.3, control.cancel.set).start()
    result = run(pipeline, message(_sleep_graph(60)), control)
    assert result.released and result.failure.code is ErrorCode.WORKER_LOST


def test_no_comfyui_is_environment_failed(tmp_path: Path) -> None:
    pl = make_pipeline(tmp_path, work_dir=tmp_path, comfyui_dir=None,
                       storage=LocalStorage(tmp_path))
    result = pl.execute(parse_message(message()), RecordingControl())
    assert result.failure.code is ErrorCode.ENVIRONMENT_FAILED


def test_models_without_store_fail_cleanly(pipeline: Pipeline) -> None:
    wf = workflow(models={"checkpoints/a.safetensors": {"sha256": "ab" * 32}})
    result = run(pipeline, message(wf=wf))
    assert result.failure.code is ErrorCode.MODEL_FETCH_FAILED


def test_commit_mismatch_is_a_warning(pipeline: Pipeline) -> None:
    result = run(pipeline, message())
    assert any("commit mismatch" in w for w in result.warnings)
    assert json.dumps(result.environment)


def test_the_path_of_a_file_input_names_its_content(pipeline: Pipeline, tmp_path: Path) -> None:
    # ComfyUI caches a node's outputs by its inputs: the path the graph gets for a caller's
    # file must change with the bytes (the fake child echoes the path it got).
    graph = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
             "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "path"}}}
    paths = []
    for i, body in enumerate(["alice's notes", "bob's notes", "alice's notes"]):
        src = tmp_path / str(i) / "notes.txt"  # one file name for all three
        src.parent.mkdir()
        src.write_text(body)
        result = run(pipeline, message(graph, input={"doc": src.as_uri()}, run_id=f"path-{i}"))
        assert result.status is RunStatus.SUCCEEDED, result.failure
        paths.append(Path(unquote(urlsplit(result.output.outputs[0].url).path)).read_text())
    assert paths[0] != paths[1] and paths[0] == paths[2]
    assert all(p.startswith("runflow_inputs/") and p.endswith("/notes.txt") for p in paths)


def test_deployed_package_versions_are_compared(pipeline: Pipeline) -> None:
    import importlib.metadata

    pytest_here = importlib.metadata.version("pytest")
    pydantic_here = importlib.metadata.version("pydantic")
    wf = workflow()
    wf["environment"]["packages"] = [
        {"name": "PyTest", "version": "0.0.1"},  # another version: reported, under its name
        {"name": "pydantic", "version": pydantic_here},  # the same: not reported
        {"name": "not-installed-anywhere", "version": "1.0"},  # not here: left out
    ]
    result = run(pipeline, message(wf=wf))
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert result.environment["package_differences"] == [
        {"name": "PyTest", "deployed": "0.0.1", "here": pytest_here}]
    (warning,) = [w for w in result.warnings if "deploying machine" in w]
    assert f"PyTest 0.0.1 -> {pytest_here}" in warning
    assert "pydantic" not in warning and "not-installed" not in warning
    # Without a package list nothing is compared.
    assert "package_differences" not in run(pipeline, message()).environment


def _now():
    from runflow_worker.run.contract import utcnow

    return utcnow()


def test_cancel_during_comfyui_start(tmp_path: Path) -> None:
    pl = make_pipeline(tmp_path, child_entry=SLOW_START_CHILD)
    control = RecordingControl()
    threading.Timer(0.3, control.cancel.set).start()
    t0 = time.monotonic()
    try:
        result = pl.execute(parse_message(message()), control)
    finally:
        pl.close()
    assert result.status is RunStatus.CANCELED
    assert time.monotonic() - t0 < 0.3 + 2.0
    assert result.timings_ms["environment"] < 2300


def test_comfyui_starts_while_inputs_download(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The child's start waits for a gate that only the input download opens: run one after
    # the other, the start would time out; run side by side, the run succeeds.
    gate = tmp_path / "gate"
    monkeypatch.setenv("RUNFLOW_TEST_START_GATE", str(gate))

    def fetch(url: str, dest: Path, *, max_bytes: int, cancel) -> None:
        gate.touch()
        copy_fetch(url, dest, max_bytes=max_bytes, cancel=cancel)

    pl = make_pipeline(tmp_path, child_entry=GATED_START_CHILD, startup_timeout_s=20,
                       allow_local_files=True, fetch_input=fetch)
    src = tmp_path / "note.txt"
    src.write_text("downloaded while ComfyUI started")
    graph = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
             "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "read": True,
                                                         "output_id": "copy"}}}
    try:
        result = run(pl, message(graph, input={"doc": src.as_uri()}))
    finally:
        pl.close()
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert result.cold_start_s > 0
    assert set(result.timings_ms) >= {"environment", "inputs", "execute"}


def test_failed_download_waits_for_the_start(tmp_path: Path) -> None:
    # A run whose input cannot be fetched ends only once ComfyUI's start is over, and leaves
    # the child warm for the next run.
    def fetch(url: str, dest: Path, *, max_bytes: int, cancel) -> None:
        raise FetchConnectError("cannot connect to the input's host")

    pl = make_pipeline(tmp_path, allow_local_files=True, fetch_input=fetch)
    graph = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
             "2": {"class_type": "FakeSave", "inputs": {"text": "x", "output_id": "copy"}}}
    try:
        failed = run(pl, message(graph, input={"doc": (tmp_path / "x").as_uri()}))
        assert failed.failure.code is ErrorCode.INPUT_FETCH_FAILED
        assert pl.supervisor.runner is not None and pl.supervisor.runner.state.value == "ready"
        ok = run(pl, message(run_id="after", input={"prompt": "warm"}))
        assert ok.status is RunStatus.SUCCEEDED and ok.cold_start_s == 0
    finally:
        pl.close()


def test_a_warm_childs_environment_phase_runs_on_the_runs_own_thread(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path)
    threads: list[str] = []
    phase = pipeline._environment
    real_run = phase.run

    def run_phase(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_run(*args, **kwargs)

    phase.run = run_phase  # type: ignore[method-assign]
    try:
        first = run(pipeline, message(run_id="warm-1", input={"prompt": "1"}))
        assert first.status is RunStatus.SUCCEEDED and first.cold_start_s > 0
        second = run(pipeline, message(run_id="warm-2", input={"prompt": "2"}))
        assert second.status is RunStatus.SUCCEEDED and second.cold_start_s == 0
    finally:
        pipeline.close()
    # The first started the child on the environment thread while its inputs came; the
    # second found its child READY: nothing to overlap, no thread woken for it.
    assert threads[0].startswith("environment") and threads[1] == "MainThread"
    assert second.environment == first.environment
