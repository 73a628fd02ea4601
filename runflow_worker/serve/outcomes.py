"""How one delivery ended (``Outcome``), and the one place that turns it into the log line
and the metrics.

``Worker.perform_run`` takes every delivery to exactly one outcome::

    skipped        the run was over already (its record terminal, or a later attempt of it
                   exists): the entry was acked; nothing run, nothing written
    finalised      the terminal record was written with its event, its callback job and the
                   ack (succeeded, failed, canceled; a message that does not parse too)
    dead_lettered  the entry went to the dead letters: delivered too often (its run
                   finalised failed ``WORKER_LOST`` in the same step), or without a usable
                   run id (no record can exist)
    promoted       out of memory: re-enqueued as its next attempt on a larger class
    released       left pending for another worker at once, its record back to ``queued``:
                   a stop's grace ran out, or ComfyUI cannot start on this worker (unfit)
    fenced         a newer pickup holds the run (this worker lost its lease): nothing more
                   written
    abandoned      the terminal write was given up (a cold stop while Redis was away, or a
                   persistent Redis error): the entry stays pending and is reclaimed

The contract's spelling of a release is the ``WORKER_LOST`` error code (SPEC §7) that a
run released too often ends with; the daemon speaks of ``released``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from runflow_worker.run.contract import RunRecord
from runflow_worker.serve.metrics import Metrics
from runflow_worker.serve.queue import Delivery

log = logging.getLogger("runflow_worker.serve.daemon")
"""The daemon's logger: an outcome's line is the daemon's, wherever it is written."""


class Outcome(StrEnum):
    """What became of one delivery (see the module docstring)."""

    SKIPPED = "skipped"
    FINALISED = "finalised"
    DEAD_LETTERED = "dead_lettered"
    PROMOTED = "promoted"
    RELEASED = "released"
    FENCED = "fenced"
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class Ending:
    """One delivery's outcome, with what its log line and metrics need."""

    outcome: Outcome
    delivery: Delivery
    run_id: str | None = None
    attempt: int | None = None
    record: RunRecord | None = None
    """The terminal record written (finalised, dead-lettered), or the terminal record of
    the attempt that was promoted (its billing, timings)."""
    reason: str | None = None
    """skipped: ``terminal`` or ``superseded``; fenced: ``lease_lost`` (while it ran) or
    ``refused`` (its terminal write); released and abandoned: the Redis error, if any."""
    promoted_to: str | None = None
    """promoted: the GPU class of the next attempt."""
    released: bool = False
    """released: the release was written (False: it failed or was fenced out; the entry is
    reclaimed after the lease)."""
    unfit: str | None = None
    """released: why ComfyUI cannot start on this worker (None: a stop released it)."""
    unfit_starts: int = 0
    """released with ``unfit``: such starts in a row, this one included."""

    @classmethod
    def of_record(cls, outcome: Outcome, delivery: Delivery, record: RunRecord,
                  **fields: Any) -> Ending:
        """An ending about ``record``'s run."""
        return cls(outcome, delivery, run_id=record.id, attempt=record.attempt,
                   record=record, **fields)


def log_started(delivery: Delivery, run_id: str, attempt: int) -> None:
    """The log line of a run that begun (its begin script's reply said ``running``)."""
    log.info("run %s started", run_id,
             extra={"run_id": run_id, "attempt": attempt, "entry_id": delivery.entry_id,
                    "deliveries": delivery.deliveries, "event": "run_started",
                    "reclaimed": delivery.reclaimed})


def report_ending(ending: Ending, metrics: Metrics, *, gpu_class: str,
                  max_unfit_starts: int) -> None:
    """The log line(s) and the metrics of ``ending``: the one place that maps an outcome to
    them."""
    extra: dict[str, Any] = {"entry_id": ending.delivery.entry_id,
                             "deliveries": ending.delivery.deliveries}
    if ending.run_id is not None:
        extra.update(run_id=ending.run_id, attempt=ending.attempt)
    run_id, outcome = ending.run_id, ending.outcome
    if outcome is Outcome.SKIPPED:
        log.info("run %s skipped: %s", run_id, ending.reason,
                 extra={**extra, "event": f"run_skipped_{ending.reason}"})
    elif outcome is Outcome.FENCED:
        metrics.fenced_writes.inc()
        if ending.reason == "lease_lost":
            log.warning("run %s: lease lost to another worker; outcome dropped", run_id,
                        extra={**extra, "event": "run_fenced"})
        else:
            log.warning("run %s: outcome refused, a newer pickup holds the run", run_id,
                        extra={**extra, "event": "run_fenced"})
    elif outcome is Outcome.RELEASED:
        _report_release(ending, extra, metrics, max_unfit_starts)
    elif outcome is Outcome.ABANDONED:
        log.error("outcome of run %s not written: %s", run_id, ending.reason,
                  extra={**extra, "event": "finalise_abandoned"})
    elif ending.record is None:  # dead-lettered without a run id
        metrics.dead_letters.inc()
        log.error("entry %s has no usable run id; dead-lettered", ending.delivery.entry_id,
                  extra={**extra, "event": "entry_dead_lettered"})
    else:
        _report_written(ending, ending.record, extra, metrics, gpu_class)


def _report_release(ending: Ending, extra: dict[str, Any], metrics: Metrics,
                    max_unfit_starts: int) -> None:
    if ending.unfit is not None:
        metrics.unfit_starts.inc()
        log.error("ComfyUI cannot start on this worker (%d of %d before it exits): %s",
                  ending.unfit_starts, max_unfit_starts, ending.unfit,
                  extra={**extra, "event": "worker_unfit", "reason": ending.unfit,
                         "unfit_starts": ending.unfit_starts})
    if ending.reason is not None:
        log.warning("could not release run %s (%s); it is reclaimed after the lease",
                    ending.run_id, ending.reason, extra={**extra, "event": "release_failed"})
    why = ("shutdown" if ending.unfit is None
           else f"this worker cannot start ComfyUI: {ending.unfit}")
    log.info("run %s released for redelivery (%s)", ending.run_id, why,
             extra={**extra, "event": "run_released", "released": ending.released,
                    "unfit": ending.unfit})


def _report_written(ending: Ending, record: RunRecord, extra: dict[str, Any],
                    metrics: Metrics, gpu_class: str) -> None:
    """Finalised, dead-lettered with a record, promoted: the record was written."""
    if ending.outcome is Outcome.DEAD_LETTERED:
        metrics.dead_letters.inc()
        log.error("run %s dead-lettered after %d deliveries", record.id,
                  ending.delivery.deliveries - 1,
                  extra={**extra, "event": "run_dead_lettered"})
    this = record.billing.attempts[-1] if record.billing.attempts else None
    if this is not None and this.gpu_seconds:
        metrics.gpu_seconds.labels(gpu_class).inc(this.gpu_seconds)
    for phase, ms in record.timings_ms.items():
        if phase != "queue":
            metrics.phase_seconds.labels(phase).observe(ms / 1000)
    if ending.outcome is Outcome.PROMOTED:
        metrics.oom_promotions.inc()
        log.info("run %s out of memory on %s: re-enqueued on %s", record.id, gpu_class,
                 ending.promoted_to,
                 extra={**extra, "event": "run_promoted", "gpu_class": ending.promoted_to})
        return
    code = (record.error or {}).get("code") or ""
    metrics.runs.labels(record.status.value, code).inc()
    log.info("run %s %s", record.id, record.status.value,
             extra={**extra, "event": "run_finished", "status": record.status.value,
                    "error_code": code or None, "duration_ms": record.duration_ms,
                    "timings_ms": record.timings_ms})
