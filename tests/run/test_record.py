"""Every record kind ``run.record`` builds, and its billing arithmetic."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runflow_worker.errors import ErrorCode, RunFailure, RunInterrupted, RunRejected, Violation
from runflow_worker.run import record as records
from runflow_worker.run.contract import (
    AttemptBilling,
    OutputEntry,
    RunMessage,
    RunOutput,
    RunStatus,
    parse_message,
)
from runflow_worker.run.pipeline import RunResult
from runflow_worker.run.record import (
    BootCharge,
    canceled_record,
    dead_letter_record,
    promoted_run,
    queued_record,
    released_record,
    running_record,
    terminal_record,
    unparseable_record,
    worker_lost,
)
from tests.support import factories

STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
FINISHED = STARTED + timedelta(seconds=4, milliseconds=250)
EARLIER = {"attempt": 1, "gpu_class": "l4", "gpu_model": "NVIDIA L4", "gpu_seconds": 12.5,
           "cold_start_seconds": 3.25, "peak_vram_bytes": 123, "outcome": "out_of_memory"}


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "utcnow", lambda: FINISHED)


def message(**overrides: Any) -> RunMessage:
    """A run message with the client's references set."""
    fields: dict[str, Any] = {"client_ref": "ref-1", "metadata": {"team": "a"}}
    fields.update(overrides)
    return parse_message(factories.message(**fields))


def second_attempt() -> RunMessage:
    """Attempt 2, carrying attempt 1's billing (an OOM promotion)."""
    return message(attempt=2, billing={"gpu_seconds": 12.5, "attempts": [EARLIER]})


def succeeded(**overrides: Any) -> RunResult:
    """A succeeded result that did GPU work."""
    fields: dict[str, Any] = {
        "status": RunStatus.SUCCEEDED, "gpu_work": True, "cold_start_s": 1.23456,
        "output": RunOutput(outputs=[OutputEntry(
            output_id="out", url="file:///o/a.txt", key="runs/run-1/out/a.txt",
            filename="a.txt", content_type="text/plain", size_bytes=3, sha256="ab" * 32)]),
        "timings_ms": {"fetch": 5, "execute": 1200}, "gpu_model": "NVIDIA L4",
        "peak_vram_bytes": 2**30, "warnings": ["w"], "environment": {"comfyui": "abc"}}
    fields.update(overrides)
    return RunResult(**fields)


def out_of_memory() -> RunResult:
    """A result that failed for lack of GPU memory."""
    return RunResult(status=RunStatus.FAILED, gpu_work=True, gpu_model="NVIDIA L4",
                     failure=RunFailure(ErrorCode.OUT_OF_MEMORY, "CUDA out of memory"),
                     timings_ms={"execute": 10}, warnings=["careful"])


def _copies_the_message(rec: Any, msg: RunMessage) -> None:
    assert rec.id == msg.run_id and rec.attempt == msg.attempt
    assert rec.workflow == {"owner": "acme", "slug": "demo", "version": "v1"}
    assert rec.created_at == msg.created_at
    assert rec.client_ref == "ref-1" and rec.metadata == {"team": "a"}


# --------------------------------------------------------------------------- non-terminal


def test_queued_record_of_the_enqueue_has_no_billing_yet() -> None:
    msg = second_attempt()
    rec = queued_record(msg)
    _copies_the_message(rec, msg)
    assert rec.status is RunStatus.QUEUED and rec.started_at is None
    assert rec.billing.gpu_seconds == 0 and rec.billing.attempts == []


def test_running_record_shows_the_attempts_billed_so_far() -> None:
    msg = second_attempt()
    rec = running_record(msg, started_at=STARTED)
    _copies_the_message(rec, msg)
    assert rec.status is RunStatus.RUNNING and rec.started_at == STARTED
    assert rec.finished_at is None and rec.error is None
    assert rec.billing == msg.billing


def test_released_record_is_queued_again_without_billing_the_attempt() -> None:
    msg = second_attempt()
    rec = released_record(msg)
    _copies_the_message(rec, msg)
    assert rec.status is RunStatus.QUEUED and rec.started_at is None
    assert rec.billing == msg.billing  # as carried: the released attempt is not billed


# --------------------------------------------------------------------------- terminal


def test_terminal_record_of_a_success() -> None:
    msg = message()
    rec = terminal_record(msg, succeeded(), started_at=STARTED, gpu_class="l4",
                          gpu_seconds=4.56789, cold_start_s=2.3456, queue_ms=77)
    _copies_the_message(rec, msg)
    assert rec.status is RunStatus.SUCCEEDED and rec.error is None
    assert rec.output is not None and rec.output.outputs[0].output_id == "out"
    assert (rec.started_at, rec.finished_at, rec.duration_ms) == (STARTED, FINISHED, 4250)
    assert list(rec.timings_ms.items()) == [("queue", 77), ("fetch", 5), ("execute", 1200)]
    assert rec.warnings == ["w"] and rec.environment == {"comfyui": "abc"}
    assert rec.billing.attempts == [AttemptBilling(
        attempt=1, gpu_class="l4", gpu_model="NVIDIA L4", gpu_seconds=4.568,
        cold_start_seconds=2.346, peak_vram_bytes=2**30, outcome="succeeded")]
    assert rec.billing.gpu_seconds == 4.568


def test_terminal_record_without_queue_time_or_environment() -> None:
    """``run`` (no queue): no ``queue`` timing; an empty environment is null."""
    rec = terminal_record(message(), succeeded(environment={}), started_at=STARTED,
                          gpu_class="cpu", gpu_seconds=1.0)
    assert "queue" not in rec.timings_ms and rec.environment is None
    assert rec.billing.attempts[0].cold_start_seconds == 0.0


def test_failed_run_keeps_its_error_and_no_output() -> None:
    result = succeeded(status=RunStatus.FAILED,
                       failure=RunInterrupted(ErrorCode.TIMEOUT, "took too long"))
    rec = terminal_record(message(), result, started_at=STARTED, gpu_class="l4",
                          gpu_seconds=2.0)
    assert rec.status is RunStatus.FAILED and rec.output is None
    assert rec.error == {"code": "TIMEOUT", "message": "took too long", "node_id": None,
                         "node_type": None}
    assert rec.billing.attempts[0].outcome == "failed"


def test_a_run_rejected_before_gpu_work_bills_nothing() -> None:
    result = RunResult(status=RunStatus.FAILED, failure=RunRejected(
        [Violation(ErrorCode.INVALID_INPUT, "input.prompt", "must be a string")]),
        cold_start_s=9.0)
    rec = terminal_record(message(), result, started_at=STARTED, gpu_class="l4",
                          gpu_seconds=3.0, cold_start_s=2.0)
    this = rec.billing.attempts[0]
    assert (this.gpu_seconds, this.cold_start_seconds) == (0.0, 0.0)
    assert rec.billing.gpu_seconds == 0.0
    assert rec.error is not None and rec.error["details"]["fields"] == ["input.prompt"]


def test_billing_sums_the_earlier_attempts_and_replaces_a_stale_line() -> None:
    stale = {"attempt": 2, "gpu_class": "x", "gpu_seconds": 99.0, "outcome": "stale"}
    msg = message(attempt=2, billing={"gpu_seconds": 111.5, "attempts": [EARLIER, stale]})
    rec = terminal_record(msg, out_of_memory(), started_at=STARTED, gpu_class="l40s",
                          gpu_seconds=1.0004)
    assert [(a.attempt, a.gpu_class, a.outcome) for a in rec.billing.attempts] == [
        (1, "l4", "out_of_memory"), (2, "l40s", "out_of_memory")]
    assert rec.billing.gpu_seconds == 13.5  # 12.5 + 1.0, the stale line left out


def test_canceled_before_it_started() -> None:
    msg = second_attempt()
    rec = canceled_record(msg, started_at=STARTED, gpu_class="l4", queue_ms=12)
    assert rec.status is RunStatus.CANCELED and rec.error is not None
    assert rec.error["code"] == "CANCELED"
    assert rec.error["message"] == "the run was canceled before it started"
    assert rec.timings_ms == {"queue": 12}
    assert rec.billing.attempts[-1].gpu_seconds == 0.0
    assert rec.billing.attempts[-1].outcome == "canceled"
    assert rec.billing.gpu_seconds == 12.5  # the earlier attempt's, nothing more


def test_dead_letter_record_is_worker_lost() -> None:
    rec = dead_letter_record(message(), deliveries=6, max_deliveries=5, started_at=STARTED,
                             gpu_class="l4", queue_ms=3)
    assert rec.status is RunStatus.FAILED and rec.error is not None
    assert rec.error["code"] == "WORKER_LOST"
    assert rec.error["details"] == {"deliveries": 5}
    assert "lost 5 times (limit 5 deliveries)" in rec.error["message"]
    assert rec.billing.gpu_seconds == 0.0 and rec.timings_ms == {"queue": 3}


def test_worker_lost_keeps_the_rejection_of_an_unparseable_message() -> None:
    rejection = RunRejected([Violation(ErrorCode.INVALID_INPUT, "message", "not JSON")])
    error = worker_lost(7, 5, rejection=rejection).as_error()
    assert error["details"] == {"deliveries": 6, "rejection": {
        "code": "INVALID_INPUT", "message": "message: not JSON"}}


def test_unparseable_record() -> None:
    error = RunRejected([Violation(ErrorCode.INVALID_INPUT, "message", "cannot be read")])
    copied = {"client_ref": "c", "metadata": {"k": 1}, "workflow": {"owner": "o"}}
    rec = unparseable_record("abc", 3, error, started_at=STARTED, gpu_class="cpu",
                             queue_ms=5, copied=copied)
    assert (rec.id, rec.attempt, rec.status) == ("abc", 3, RunStatus.FAILED)
    assert rec.client_ref == "c" and rec.metadata == {"k": 1}
    assert rec.workflow == {"owner": "o"}
    assert (rec.finished_at, rec.duration_ms) == (FINISHED, 4250)
    assert rec.error == error.as_error() and rec.timings_ms == {"queue": 5}
    assert rec.billing.gpu_seconds == 0.0
    assert rec.billing.attempts == [AttemptBilling(attempt=3, gpu_class="cpu",
                                                   outcome="failed")]


def test_unparseable_record_leaves_out_metadata_too_deep_to_serialise() -> None:
    deep: dict[str, Any] = {}
    for _ in range(600):
        deep = {"a": deep}
    error = RunRejected([Violation(ErrorCode.INVALID_INPUT, "message", "nested too deeply")])
    rec = unparseable_record("deep", 1, error, started_at=STARTED, gpu_class="cpu",
                             queue_ms=0, copied={"metadata": deep, "client_ref": "kept"})
    assert rec.metadata == {} and rec.client_ref == "kept"
    json.loads(rec.to_json())


# --------------------------------------------------------------------------- promotion


def test_promotion_carries_the_whole_billing_into_the_next_attempt() -> None:
    msg = second_attempt()
    terminal = terminal_record(msg, out_of_memory(), started_at=STARTED, gpu_class="l40s",
                               gpu_seconds=2.0)
    following, queued = promoted_run(msg, terminal)
    assert following.attempt == 3 and following.run_id == msg.run_id
    assert following.workflow == msg.workflow and following.input == msg.input
    assert following.billing == terminal.billing
    assert following.billing is not terminal.billing  # a copy, not shared
    assert following.billing.gpu_seconds == 14.5
    assert [a.attempt for a in following.billing.attempts] == [1, 2]
    assert queued.status is RunStatus.QUEUED and queued.attempt == 3
    assert queued.billing == terminal.billing and queued.warnings == ["careful"]
    assert msg.attempt == 2  # the message itself is untouched


# --------------------------------------------------------------------------- boot charge


def test_the_boot_is_charged_once_to_the_first_run_that_does_gpu_work() -> None:
    charge = BootCharge(boot_s=5.0)
    rejected = RunResult(status=RunStatus.FAILED, cold_start_s=1.0)
    assert charge.cold_start_s(rejected) == 0.0  # no GPU work: no cold start, boot kept
    assert charge.cold_start_s(succeeded(cold_start_s=1.5)) == 6.5
    assert charge.cold_start_s(succeeded(cold_start_s=1.5)) == 1.5
    assert charge.cold_start_s(succeeded(cold_start_s=0.0)) == 0.0
