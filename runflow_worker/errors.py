"""Errors of the ``worker`` package and the run error codes of the contract.

Hierarchy::

    WorkerError
    ├── ConfigError             bad RUNFLOW_* setting or CLI argument
    ├── StorageError            output storage unreachable / refused (-> UPLOAD_FAILED)
    ├── UploadCanceled          an upload stopped on the run's stop; also a
    │                           ``cache.errors.Canceled``, the base of every "canceled"
    ├── QueueError              Redis unreachable or refused (translated from redis-py)
    └── RunFailure              a run ends failed/canceled with a contract error code
        ├── RunRejected         a SPEC section 3 rule failed before any GPU work (bills 0)
        └── RunInterrupted      cancel / timeout / release reached the run
            └── RunReleased     the run goes back to the queue unfinalised
                └── WorkerUnfit ComfyUI cannot start here through the worker's fault

Foreign errors (redis, botocore, cache, runtime) are translated at the boundary with
``raise ... from exc`` so callers only ever see these classes; a run's are translated by
``run.failures`` (every ``Canceled`` to the stop's ``RunInterrupted``, the cache's errors to
the phase's error code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from runflow_worker.cache.errors import Canceled


class ErrorCode(StrEnum):
    """The run error codes of SPEC section 7."""

    INVALID_INPUT = "INVALID_INPUT"
    INVALID_WORKFLOW = "INVALID_WORKFLOW"
    INVALID_SHA = "INVALID_SHA"
    UNPINNED_CUSTOM_NODE = "UNPINNED_CUSTOM_NODE"
    FORBIDDEN_ORIGIN = "FORBIDDEN_ORIGIN"
    ENVIRONMENT_FAILED = "ENVIRONMENT_FAILED"
    MODEL_FETCH_FAILED = "MODEL_FETCH_FAILED"
    INPUT_FETCH_FAILED = "INPUT_FETCH_FAILED"
    NODE_ERROR = "NODE_ERROR"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    TIMEOUT = "TIMEOUT"
    CANCELED = "CANCELED"
    WORKER_LOST = "WORKER_LOST"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    INTERNAL = "INTERNAL"


class WorkerError(Exception):
    """Base of every error this package raises."""


class ConfigError(WorkerError):
    """A setting or CLI argument is invalid."""


class StorageError(WorkerError):
    """Output storage failed (the run fails with UPLOAD_FAILED)."""


class UploadCanceled(WorkerError, Canceled):
    """A transfer stopped because the caller's ``should_stop`` returned True."""


class QueueError(WorkerError):
    """Redis failed or is unreachable."""


@dataclass(frozen=True)
class Violation:
    """One offending field of a rejected run: its code, dotted path and what is wrong."""

    code: ErrorCode
    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The violation as plain JSON data."""
        return {"code": self.code.value, "field": self.field, "message": self.message}


@dataclass
class RunFailure(WorkerError):
    """A run ends with this contract error (``error`` of the run record)."""

    code: ErrorCode
    message: str
    node_id: str | None = None
    node_type: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.code.value}: {self.message}")

    def as_error(self) -> dict[str, Any]:
        """The ``error`` object of the run record."""
        out: dict[str, Any] = {
            "code": self.code.value,
            "message": self.message,
            "node_id": self.node_id,
            "node_type": self.node_type,
        }
        if self.details:
            out["details"] = self.details
        return out


# Precedence when one message breaks several rules: the order of SPEC section 3.
_REJECT_ORDER = (
    ErrorCode.UNPINNED_CUSTOM_NODE,
    ErrorCode.FORBIDDEN_ORIGIN,
    ErrorCode.INVALID_SHA,
    ErrorCode.INVALID_INPUT,
    ErrorCode.INVALID_WORKFLOW,
)


class RunRejected(RunFailure):
    """The message broke SPEC section 3 rules; every violation is listed in ``details``."""

    def __init__(self, violations: list[Violation]) -> None:
        if not violations:
            raise ValueError("RunRejected needs at least one violation")
        self.violations = list(violations)
        codes = {v.code for v in violations}
        code = next(c for c in _REJECT_ORDER if c in codes) if codes & set(_REJECT_ORDER) else (
            violations[0].code
        )
        fields = sorted({v.field for v in violations if v.code == code})
        message = "; ".join(f"{v.field}: {v.message}" for v in violations if v.code == code)
        super().__init__(
            code=code,
            message=message,
            details={
                "fields": fields,
                "violations": [v.as_dict() for v in violations],
            },
        )


class RunInterrupted(RunFailure):
    """The run was interrupted: ``CANCELED``, ``TIMEOUT``, or released (``RunReleased``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code=code, message=message)


class RunReleased(RunInterrupted):
    """The run goes back to the queue instead of being finalised: the worker shuts down or
    lost the run's lease, or cannot start ComfyUI (``WorkerUnfit``). Its code is the
    contract's ``WORKER_LOST``, which a record shows only if the run is never picked up
    again."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.WORKER_LOST, message)


class WorkerUnfit(RunReleased):
    """ComfyUI cannot start on this worker for a reason that is not the run's (CUDA unusable,
    the cache volume full, the baked checkout missing): the run goes back to the queue
    untouched, as on a shutdown, and the worker counts the start against its own health."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"this worker cannot start ComfyUI: {reason}")
        self.reason = reason
