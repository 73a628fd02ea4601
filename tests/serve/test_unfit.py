"""Black-hole protection: a worker on which ComfyUI cannot start through its own fault
(CUDA unusable, a missing baked checkout) fails no run. It releases each run untouched,
answers 503 on ``/readyz``, exits 3 after ``RUNFLOW_MAX_UNFIT_STARTS`` such starts, and a
healthy worker then runs every one of those runs to success."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from runflow_worker.serve import keys
from runflow_worker.serve.daemon import EXIT_UNFIT
from tests.fakes import INIT_FAILED_CHILD, SECOND_START_GATED_CHILD
from tests.fakes.nvml import NO_DRIVER, fake_pynvml
from tests.support.paths import REPO
from tests.support.queue import events, fence_value, record, status_of, submit, terminal_events
from tests.support.redis_server import RedisServer, free_port
from tests.support.waiting import wait_for
from tests.support.workers import InProcessWorker, make_worker


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


def _start(redis_server: RedisServer, tmp_path: Path, *, cpu: bool, child_entry: str,
           burst: bool = False, http_port: int = 0, **overrides: object) -> InProcessWorker:
    """An in-process worker whose ComfyUI child is ``child_entry`` (on the CPU or not)."""
    # Unsandboxed: the gated test child counts its starts in files beside the test.
    return InProcessWorker(make_worker(redis_server.url, tmp_path, child_entry=child_entry,
                                       cpu=cpu, child_sandbox=False, http_port=http_port,
                                       **overrides),
                           burst=burst)


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _assert_untouched_then_healthy(r: redis.Redis, ids: list[str]) -> None:
    """What the unfit worker left: every run queued again, attempt 1, nothing billed, no
    terminal event, nothing dead-lettered."""
    for run_id in ids:
        rec = record(r, run_id)
        assert rec["status"] == "queued", rec
        assert rec["attempt"] == 1 and rec["billing"]["attempts"] == []
        assert terminal_events(r, run_id) == []
    assert r.xlen(keys.DEAD_LETTER_STREAM) == 0


def _assert_all_succeeded_once(r: redis.Redis, ids: list[str]) -> None:
    for run_id in ids:
        rec = record(r, run_id)
        assert rec["status"] == "succeeded", rec
        assert rec["attempt"] == 1 and len(rec["billing"]["attempts"]) == 1
        assert [e["status"] for e in terminal_events(r, run_id)] == ["succeeded"]
        statuses = [e["status"] for e in events(r, run_id) if e["type"] == "status"]
        assert "failed" not in statuses
    assert r.xlen(keys.DEAD_LETTER_STREAM) == 0


@pytest.mark.timeout(120)
def test_worker_without_usable_cuda_releases_every_run_then_exits(
        r: redis.Redis, redis_server: RedisServer, inprocess_worker, tmp_path: Path) -> None:
    """A worker told to run ComfyUI on CUDA where CUDA cannot initialise (a driver that does
    not match, here: no CUDA at all). Its child fails to start; the worker's own device
    check (a trusted child, no custom node) fails too, so the fault is the worker's."""
    if _cuda_usable():
        pytest.skip("CUDA works on this machine: the start cannot fail for want of it")
    ids = [submit(r, f"bh-{i}") for i in range(4)]
    port = free_port()
    unfit = _start(redis_server, tmp_path, cpu=False, http_port=port,
                   child_entry=SECOND_START_GATED_CHILD,
                   max_unfit_starts=2)
    starts = tmp_path / "comfyui" / "starts"
    try:
        # The second start waits at its gate: the worker is between two unfit starts.
        wait_for(lambda: unfit.worker.unfit_starts == 1 and starts.exists()
                 and len(starts.read_text().splitlines()) == 2, 60, "the second start")
        assert _http_status(port, "/readyz") == 503
        assert _http_status(port, "/healthz") == 200
        (tmp_path / "comfyui" / "gate").touch()
        unfit.thread.join(60)
        assert not unfit.thread.is_alive()
    finally:
        unfit.stop()
    assert unfit.exit_code == EXIT_UNFIT
    assert unfit.worker.unfit_starts == 2
    assert "CUDA" in (unfit.worker.unfit_reason or "")
    _assert_untouched_then_healthy(r, ids)

    healthy = inprocess_worker(burst=True)
    healthy.thread.join(60)
    assert healthy.exit_code == 0
    _assert_all_succeeded_once(r, ids)


@pytest.mark.timeout(120)
def test_serve_with_missing_checkout_exits_3_and_fails_no_run(r: redis.Redis, spawn_worker,
                                                              tmp_path: Path) -> None:
    """The real command: a baked checkout that is not there is the worker's fault."""
    ids = [submit(r, f"nock-{i}") for i in range(3)]
    unfit = spawn_worker(env={"RUNFLOW_COMFYUI_DIR": str(tmp_path / "no-such-checkout"),
                              "RUNFLOW_MAX_UNFIT_STARTS": "2"})
    assert unfit.wait(60) == EXIT_UNFIT
    released = unfit.logged("run_released")
    assert len(released) == 2
    assert all("no-such-checkout" in (line.get("unfit") or "") for line in released)
    assert [line["unfit_starts"] for line in unfit.logged("worker_unfit")] == [1, 2]
    assert [status_of(r, i) for i in ids] == ["queued"] * 3
    _assert_untouched_then_healthy(r, ids)

    healthy = spawn_worker("--burst")
    assert healthy.wait(60) == 0
    _assert_all_succeeded_once(r, ids)


@pytest.mark.timeout(60)
def test_a_run_whose_own_start_fails_still_fails(r: redis.Redis, redis_server: RedisServer,
                                                 tmp_path: Path) -> None:
    """The other side of the line: a child that fails to start while the device works (a
    custom node that does not import) fails the run ENVIRONMENT_FAILED, as before."""
    submit(r, "own-fault")
    w = _start(redis_server, tmp_path, cpu=True, burst=True,
               child_entry=INIT_FAILED_CHILD)
    try:
        w.thread.join(30)
    finally:
        w.stop()
    assert w.exit_code == 0
    rec = record(r, "own-fault")
    assert rec["status"] == "failed" and rec["error"]["code"] == "ENVIRONMENT_FAILED"
    assert w.worker.unfit_starts == 0


@pytest.mark.timeout(60)
def test_serve_refuses_a_gpu_class_without_cuda(r: redis.Redis, spawn_worker,
                                                tmp_path: Path) -> None:
    """Class l4 where NVML finds no GPU (no driver): exit 2 with one line, before any run
    is taken; RUNFLOW_DEVICE=cpu serves the same class with ComfyUI on the CPU (the fake
    child would fail its start were it asked for CUDA)."""
    fake = fake_pynvml(tmp_path / "fake-nvml", NO_DRIVER)
    env = {"RUNFLOW_GPU_CLASS": "l4", "PYTHONPATH": f"{fake}:{REPO}"}
    submit(r, "on-l4", gpu_class="l4")
    refused = spawn_worker("--burst", env=env)
    assert refused.wait(30) == 2
    (line,) = [ln for ln in refused.log_path.read_text().splitlines() if ln.strip()]
    assert line.startswith("runflow-worker serve: GPU class 'l4' needs a CUDA device")
    assert "RUNFLOW_DEVICE=cpu" in line
    assert status_of(r, "on-l4") == "queued" and fence_value(r, "on-l4") == 0

    on_cpu = spawn_worker("--burst", env={**env, "RUNFLOW_DEVICE": "cpu"})
    assert on_cpu.wait(60) == 0
    rec = record(r, "on-l4")
    assert rec["status"] == "succeeded", rec
    assert rec["billing"]["attempts"][0]["gpu_class"] == "l4"
