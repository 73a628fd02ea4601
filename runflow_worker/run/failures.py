"""How what stops one run becomes its failure: the driver's stop, the layers' errors, the job's
outcome. The pipeline's one place of translation (SPEC section 7's codes).

- A stop (``StopReason``: cancel, timeout, shutdown) is a ``RunInterrupted`` (``interrupted``,
  ``check_stop``).
- Every ``cache.errors.Canceled`` (a fetch, an environment build, a ComfyUI start, an upload
  that stopped because the run's stop asked it to) is the stop's ``RunInterrupted``; a cache
  failure is the phase's error code, a refused git origin ``FORBIDDEN_ORIGIN``
  (``run_failures``, a context manager around each step).
- A failed job (``protocol.Failed``) is its kind's code (``job_failure``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from runflow_worker.cache.errors import CacheError, Canceled, OriginRefused
from runflow_worker.errors import ErrorCode, RunFailure, RunInterrupted, RunReleased, WorkerUnfit
from runflow_worker.run.fitness import disk_problem
from runflow_worker.runtime import protocol as p


class StopReason(StrEnum):
    """Why a driver wants the current run to stop."""

    CANCELED = "canceled"
    TIMEOUT = "timeout"
    RELEASE = "release"
    """Release the run to the queue, do not finalise it: graceful shutdown ran out of time,
    or the worker lost the run's lease."""


StopCheck = Callable[[], StopReason | None]
"""A run's stop, polled: non-None once the run must stop."""

Blame = Callable[[], tuple[str, dict[str, Any]]]
"""The prefix of a cache failure's message and its details (``run_failures``)."""


def interrupted(reason: StopReason) -> RunInterrupted:
    """The run's failure for a stop."""
    if reason is StopReason.TIMEOUT:
        return RunInterrupted(ErrorCode.TIMEOUT, "the run exceeded its timeout_s")
    if reason is StopReason.RELEASE:
        return RunReleased("the worker shut down before the run finished")
    return RunInterrupted(ErrorCode.CANCELED, "the run was canceled")


def check_stop(stop_reason: StopCheck) -> None:
    """Raise the stop's ``RunInterrupted`` once the run must stop."""
    reason = stop_reason()
    if reason is not None:
        raise interrupted(reason)


@contextmanager
def run_failures(stop_reason: StopCheck, code: ErrorCode | None = None, *,
                 blame: Blame | None = None,
                 full_volume: Path | None = None) -> Iterator[None]:
    """Translates what ends the step inside into the run's failure.

    - Any ``Canceled``: the stop's ``RunInterrupted`` (``CANCELED`` if the stop is gone by
      now: what was canceled was this run).
    - With ``code``, a ``CacheError``: ``RunFailure(code)`` (``FORBIDDEN_ORIGIN`` for a
      refused git origin), its message ``blame()``'s prefix and the error's text, its details
      ``blame()``'s (asked only then, so they can say what the failure left undone).
    - With ``code`` and ``full_volume``, a cache or OS error (a refused origin aside) while
      the volume holding ``full_volume`` is full: ``WorkerUnfit`` instead (the worker's
      fault, not the run's: ``run.fitness``).

    Anything else leaves as it came (a ``RunFailure`` of the step's own, a bug).
    """
    try:
        yield
    except Canceled as exc:  # first: FetchCanceled and BuildCanceled are cache errors too
        raise interrupted(stop_reason() or StopReason.CANCELED) from exc
    except (CacheError, OSError) as exc:
        if code is None:
            raise
        refused = isinstance(exc, OriginRefused)  # the run's fault, whatever the disk says
        if full_volume is not None and not refused:
            full = disk_problem(full_volume, exc)
            if full is not None:
                raise WorkerUnfit(full) from exc
        if not isinstance(exc, CacheError):
            raise
        prefix, details = blame() if blame is not None else ("", {})
        raise RunFailure(ErrorCode.FORBIDDEN_ORIGIN if refused else code, f"{prefix}{exc}",
                         details=details) from exc


_FAILURE_CODES = {
    p.FailureKind.INVALID_WORKFLOW: ErrorCode.INVALID_WORKFLOW,
    p.FailureKind.NODE_ERROR: ErrorCode.NODE_ERROR,
    p.FailureKind.OUT_OF_MEMORY: ErrorCode.OUT_OF_MEMORY,
    p.FailureKind.CHILD_DIED: ErrorCode.INTERNAL,
    p.FailureKind.INTERNAL: ErrorCode.INTERNAL,
}


def job_failure(outcome: p.Failed, reason: StopReason | None) -> RunFailure:
    """The run's failure for a failed job; ``reason`` is the run's stop, if any (an
    interrupted job, or a child that died while the run stopped, is the stop's)."""
    if outcome.kind is p.FailureKind.INTERRUPTED or (
        reason is not None and outcome.kind is p.FailureKind.CHILD_DIED
    ):
        return interrupted(reason or StopReason.CANCELED)
    details = dict(outcome.details)
    if outcome.exception_type:
        details["exception_type"] = outcome.exception_type
    return RunFailure(_FAILURE_CODES[outcome.kind], outcome.message,
                      node_id=outcome.node_id, node_type=outcome.node_type, details=details)
