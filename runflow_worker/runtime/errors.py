"""Errors of the ``runtime`` package.

Hierarchy::

    RuntimeFailure
    ├── RunnerStateError     an operation not allowed in the runner's current state
    ├── RunnerStartFailed    the ComfyUI child could not start (import, init, died, timeout)
    ├── RunnerStartCanceled  the start was interrupted (cancel, timeout, shutdown); also a
    │                        ``cache.errors.Canceled``, the base of every "canceled"
    └── ProtocolError        the child broke the channel's protocol (frame or message)

Job outcomes (node errors, OOM, interrupts, child death mid-job) are not exceptions: the
runner returns them as ``protocol.Failed`` values. So are channel failures during a job (a
``ProtocolError``: a malformed frame, a message outside the schema): the child is killed
and the job fails with ``INTERNAL``; during a start they raise ``RunnerStartFailed``.
"""

from __future__ import annotations

from runflow_worker.cache.errors import Canceled


class RuntimeFailure(Exception):
    """Base of every error this package raises."""


class RunnerStateError(RuntimeFailure):
    """The runner is not in a state that allows the operation."""


class RunnerStartFailed(RuntimeFailure):
    """The ComfyUI child failed to become READY."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


class RunnerStartCanceled(RuntimeFailure, Canceled):
    """The start was interrupted on the caller's request; the child was killed."""


class ProtocolError(RuntimeFailure):
    """The child sent something that is not a protocol message; the text names what."""
