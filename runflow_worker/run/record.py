"""Every run record (SPEC §7) and all of its billing, built in one place.

The records of one run, in the order a run meets them::

    queued_record       the enqueue writes it (``submit``)
    running_record      each pickup writes it (billing: the attempts carried by the message)
    released_record     a released run goes back to ``queued`` (its attempt is not billed)
    terminal_record     the outcome of an executed attempt (``serve`` and ``run``)
    canceled_record     canceled before it started (the cancel flag was set at pickup)
    dead_letter_record  delivered too often: failed ``WORKER_LOST``
    unparseable_record  a message that does not parse, built from what could be salvaged
    promoted_run        out of memory: the next attempt's message and its ``queued`` record

Billing (SPEC §7): ``billing.attempts`` lists the earlier attempts the message carries, then
this one (``attempt_billing``); ``billing.gpu_seconds`` is the sum over attempts. An attempt
bills its wall time from pickup and its cold start only when it did GPU work (a run rejected
before any is 0 s). The container's boot is charged once, as cold start, to the first run of
the process that does GPU work (``BootCharge``). An out-of-memory promotion carries the whole
billing, sum included, into the next attempt's message, so every later record shows what was
billed so far.

These functions build records; ``serve.recordstore`` writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runflow_worker.errors import ErrorCode, RunFailure, RunInterrupted
from runflow_worker.run.contract import (
    AttemptBilling,
    Billing,
    RunMessage,
    RunRecord,
    RunStatus,
    utcnow,
)
from runflow_worker.run.pipeline import RunResult

# --------------------------------------------------------------------------- billing


@dataclass(frozen=True)
class AttemptStart:
    """When an attempt began: its records' ``started_at``, the monotonic instant its GPU
    time is billed from, and (``serve``) how long its entry had waited in the queue."""

    started_at: datetime
    monotonic_s: float
    queue_ms: int | None = None

    @classmethod
    def now(cls, *, enqueued_unix_ms: int | None = None) -> AttemptStart:
        """An attempt starting now; ``enqueued_unix_ms``: when its entry was queued."""
        monotonic_s, started_at = time.monotonic(), utcnow()
        queue_ms = (None if enqueued_unix_ms is None
                    else max(0, int(time.time() * 1000) - enqueued_unix_ms))
        return cls(started_at, monotonic_s, queue_ms)

    def gpu_seconds(self) -> float:
        """The attempt's wall time so far: what it bills as GPU time if it did GPU work."""
        return time.monotonic() - self.monotonic_s


class BootCharge:
    """The container's boot time, billed once: as cold start of the first run of the process
    that does GPU work (runs rejected before any GPU work do not take it)."""

    def __init__(self, boot_s: float = 0.0) -> None:
        self.boot_s = boot_s
        """Seconds from the process's start to serving (set once the daemon serves)."""
        self.charged = False

    def cold_start_s(self, result: RunResult) -> float:
        """The cold start to bill for ``result``: the child's start in this run, plus the
        boot on the first run that did GPU work; 0 without GPU work."""
        if not result.gpu_work:
            return 0.0
        cold = result.cold_start_s
        if not self.charged:
            self.charged = True
            cold += self.boot_s
        return cold


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


def billing_with(message: RunMessage, this: AttemptBilling) -> Billing:
    """The message's earlier attempts, then ``this`` one (replacing any line of the same
    attempt), with ``gpu_seconds`` their sum."""
    earlier = [a for a in message.billing.attempts if a.attempt != message.attempt]
    attempts = [*earlier, this]
    return Billing(gpu_seconds=round(sum(a.gpu_seconds for a in attempts), 3),
                   attempts=attempts)


# --------------------------------------------------------------------------- records


def record_for(message: RunMessage, status: RunStatus, **fields: Any) -> RunRecord:
    """A record of ``message`` with ``status`` and the given fields (the message's
    ``workflow`` names, ``created_at``, ``client_ref`` and ``metadata`` copied)."""
    wf = message.workflow
    return RunRecord(
        id=message.run_id,
        status=status,
        attempt=message.attempt,
        workflow={"owner": wf.owner, "slug": wf.slug, "version": wf.version},
        created_at=message.created_at,
        client_ref=message.client_ref,
        metadata=message.metadata,
        **fields,
    )


def queued_record(message: RunMessage) -> RunRecord:
    """The ``queued`` record the enqueue writes (no billing yet)."""
    return record_for(message, RunStatus.QUEUED)


def running_record(message: RunMessage, *, started_at: datetime) -> RunRecord:
    """The ``running`` record of a pickup: the earlier attempts' billing, as carried."""
    return record_for(message, RunStatus.RUNNING, started_at=started_at,
                      billing=message.billing)


def released_record(message: RunMessage) -> RunRecord:
    """The record of a released run, back to ``queued`` so that nobody reads a run no worker
    holds as ``running``: billing as the message carries it (a released attempt is not
    billed)."""
    return record_for(message, RunStatus.QUEUED, billing=message.billing)


def terminal_record(message: RunMessage, result: RunResult, *, started_at: datetime,
                    gpu_class: str, gpu_seconds: float, cold_start_s: float = 0.0,
                    queue_ms: int | None = None,
                    finished_at: datetime | None = None) -> RunRecord:
    """The terminal record of ``message`` from ``result`` with its billing.

    ``gpu_seconds``: the attempt's wall time from pickup (``AttemptStart.gpu_seconds``);
    ``cold_start_s``: the child's start in this run, or what ``BootCharge.cold_start_s`` gives (both billed only when ``result`` did GPU work).
    ``queue_ms`` (serve only) leads ``timings_ms`` as ``queue``.
    """
    finished_at = finished_at or utcnow()
    this = attempt_billing(message, result, gpu_class=gpu_class, gpu_seconds=gpu_seconds,
                           cold_start_s=cold_start_s)
    timings = dict(result.timings_ms)
    if queue_ms is not None:
        timings = {"queue": queue_ms, **timings}
    failure: RunFailure | None = result.failure
    return record_for(
        message, result.status,
        started_at=started_at,
        finished_at=finished_at,
        duration_ms=_duration_ms(started_at, finished_at),
        output=result.output if result.status is RunStatus.SUCCEEDED else None,
        error=failure.as_error() if failure is not None else None,
        billing=billing_with(message, this),
        timings_ms=timings,
        warnings=list(result.warnings),
        environment=result.environment or None,
    )


def canceled_record(message: RunMessage, *, started_at: datetime, gpu_class: str,
                    queue_ms: int) -> RunRecord:
    """The ``canceled`` record of a run whose cancel flag was set before it started (0 s)."""
    result = RunResult(status=RunStatus.CANCELED, failure=RunInterrupted(
        ErrorCode.CANCELED, "the run was canceled before it started"))
    return terminal_record(message, result, started_at=started_at, gpu_class=gpu_class,
                           gpu_seconds=0.0, queue_ms=queue_ms)


def worker_lost(deliveries: int, max_deliveries: int, *,
                rejection: RunFailure | None = None) -> RunFailure:
    """The ``WORKER_LOST`` error of a run whose entry was delivered more than
    ``max_deliveries`` times (SPEC §2); ``deliveries`` counts this delivery too.

    ``rejection``: why the message does not parse either (its code and message are kept in
    the error's ``details``: the earlier holders died, the message is also at fault).
    """
    details: dict[str, Any] = {"deliveries": deliveries - 1}
    if rejection is not None:
        details["rejection"] = {"code": rejection.code.value, "message": rejection.message}
    return RunFailure(
        ErrorCode.WORKER_LOST,
        f"the worker running this run was lost {deliveries - 1} times "
        f"(limit {max_deliveries} deliveries); moved to the dead-letter stream",
        details=details)


def dead_letter_record(message: RunMessage, *, deliveries: int, max_deliveries: int,
                       started_at: datetime, gpu_class: str, queue_ms: int) -> RunRecord:
    """The ``failed`` (``WORKER_LOST``) record of a run delivered too often (0 s)."""
    result = RunResult(status=RunStatus.FAILED,
                       failure=worker_lost(deliveries, max_deliveries))
    return terminal_record(message, result, started_at=started_at, gpu_class=gpu_class,
                           gpu_seconds=0.0, queue_ms=queue_ms)


def unparseable_record(run_id: str, attempt: int, error: RunFailure, *, started_at: datetime,
                       gpu_class: str, queue_ms: int, copied: dict[str, Any]) -> RunRecord:
    """The ``failed`` record of a message that does not parse (0 s billed).

    ``run_id`` and ``attempt`` are what could be read of the raw message; ``copied`` holds
    the client's references found for it (``workflow``, ``created_at``, ``client_ref``,
    ``metadata``: ``serve.salvage``). A ``metadata`` nested past the serialiser's depth limit
    is left out.
    """
    finished_at = utcnow()

    def build(extra: dict[str, Any]) -> RunRecord:
        return RunRecord(
            id=run_id, status=RunStatus.FAILED, attempt=attempt, started_at=started_at,
            finished_at=finished_at, duration_ms=_duration_ms(started_at, finished_at),
            error=error.as_error(), timings_ms={"queue": queue_ms},
            billing=Billing(attempts=[AttemptBilling(attempt=attempt, gpu_class=gpu_class,
                                                     outcome=RunStatus.FAILED.value)]),
            **extra)

    record = build(copied)
    try:
        record.to_json()
    except Exception:  # noqa: BLE001 - metadata nested past the serialiser's depth limit
        record = build({k: v for k, v in copied.items() if k != "metadata"})
    return record


def promoted_run(message: RunMessage, record: RunRecord) -> tuple[RunMessage, RunRecord]:
    """The out-of-memory re-enqueue of ``message``: the next attempt's message, carrying
    this attempt's terminal ``record``'s whole billing, and the ``queued`` record written
    instead of a terminal one (this attempt's warnings kept)."""
    # The whole billing (the sum too): the next attempt's records start from it (SPEC §7:
    # billing.gpu_seconds is the sum over attempts).
    nxt = message.model_copy(update={"attempt": message.attempt + 1,
                                     "billing": record.billing.model_copy(deep=True)})
    queued = record_for(nxt, RunStatus.QUEUED, billing=record.billing, warnings=record.warnings)
    return nxt, queued


def _duration_ms(started_at: datetime, finished_at: datetime) -> int:
    return max(0, round((finished_at - started_at).total_seconds() * 1000))
