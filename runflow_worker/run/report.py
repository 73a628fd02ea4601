"""Turns a pipeline result into the terminal run record (shared by ``run`` and ``serve``)."""

from __future__ import annotations

from datetime import datetime

from runflow_worker.errors import RunFailure
from runflow_worker.run.contract import (
    AttemptBilling,
    Billing,
    RunMessage,
    RunRecord,
    RunStatus,
    record_for,
    utcnow,
)
from runflow_worker.run.pipeline import RunResult


def attempt_billing(message: RunMessage, result: RunResult, *, gpu_class: str,
                    gpu_seconds: float, cold_start_s: float) -> AttemptBilling:
    """This attempt's line of ``billing.attempts`` (0 s for runs rejected before GPU work)."""
    billed = result.gpu_work
    return AttemptBilling(
        attempt=message.attempt,
        gpu_class=gpu_class,
        gpu_model=result.gpu_model,
        gpu_seconds=round(gpu_seconds, 3) if billed else 0.0,
        cold_start_seconds=round(cold_start_s, 3) if billed else 0.0,
        peak_vram_bytes=result.peak_vram_bytes,
        outcome=result.status.value if result.failure is None or not result.oom
        else "out_of_memory",
    )


def terminal_record(message: RunMessage, result: RunResult, *, started_at: datetime,
                    gpu_class: str, gpu_seconds: float, cold_start_s: float = 0.0,
                    queue_ms: int | None = None,
                    finished_at: datetime | None = None) -> RunRecord:
    """The terminal record of ``message`` from ``result`` with its billing."""
    finished_at = finished_at or utcnow()
    this = attempt_billing(message, result, gpu_class=gpu_class, gpu_seconds=gpu_seconds,
                           cold_start_s=cold_start_s)
    earlier = [a for a in message.billing.attempts if a.attempt != message.attempt]
    attempts = [*earlier, this]
    timings = dict(result.timings_ms)
    if queue_ms is not None:
        timings = {"queue": queue_ms, **timings}
    failure: RunFailure | None = result.failure
    return record_for(
        message, result.status,
        started_at=started_at,
        finished_at=finished_at,
        duration_ms=max(0, round((finished_at - started_at).total_seconds() * 1000)),
        output=result.output if result.status is RunStatus.SUCCEEDED else None,
        error=failure.as_error() if failure is not None else None,
        billing=Billing(gpu_seconds=round(sum(a.gpu_seconds for a in attempts), 3),
                        attempts=attempts),
        timings_ms=timings,
        warnings=list(result.warnings),
        environment=result.environment or None,
    )
