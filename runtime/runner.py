"""The runner: supervises one spawned ComfyUI child per environment, joined by a pipe.

States (one transition function, ``_transition``, checks every change)::

    NEW -> STARTING -> READY <-> BUSY
              |          |        |
              +------> DEFUNCT <--+      DEFUNCT -> STARTING (restart)

A child that dies becomes a readable failure ("exit code -9 (SIGKILL), probably out of
memory"), never a hang: the parent waits on the pipe *and* the process sentinel. An
interrupt that the child does not honour within ``interrupt_kill_after_s`` kills it, so a
cancel or timeout always lands in bounded time.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection, wait
from typing import Any

from runtime import protocol as p
from runtime.errors import (
    ProtocolError,
    RunnerStartCanceled,
    RunnerStartFailed,
    RunnerStateError,
)

log = logging.getLogger(__name__)


class RunnerState(StrEnum):
    """Lifecycle of the ComfyUI child as the parent sees it."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEFUNCT = "defunct"


_TRANSITIONS: dict[RunnerState, frozenset[RunnerState]] = {
    RunnerState.NEW: frozenset({RunnerState.STARTING, RunnerState.DEFUNCT}),
    RunnerState.STARTING: frozenset({RunnerState.READY, RunnerState.DEFUNCT}),
    RunnerState.READY: frozenset({RunnerState.BUSY, RunnerState.DEFUNCT}),
    RunnerState.BUSY: frozenset({RunnerState.READY, RunnerState.DEFUNCT}),
    RunnerState.DEFUNCT: frozenset({RunnerState.STARTING, RunnerState.DEFUNCT}),
}


@dataclass(frozen=True)
class RunnerConfig:
    """Everything the child needs to initialise ComfyUI; plain data, sent at spawn."""

    comfyui_dir: str
    base_dir: str
    """Scratch base directory for ComfyUI's own default folders (never a run's files)."""
    env_key: str = "default"
    custom_node_dirs: tuple[str, ...] = ()
    extra_sys_path: tuple[str, ...] = ()
    cpu: bool | None = None
    """Force CPU (True), force GPU (False) or detect (None)."""
    startup_timeout_s: float = 600.0
    child_entry: str = "runtime.child:main"
    """``module:function`` run in the child; tests swap in a fake child here."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the child."""


def describe_exit(exitcode: int | None) -> str:
    """Human text for a child's exit code, e.g. ``exit code -9 (SIGKILL), probably OOM``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            signal.SIGKILL: ", probably out of memory (or killed by the operator)",
            signal.SIGSEGV: ", a segmentation fault (a native extension or CUDA crashed)",
            signal.SIGABRT: ", aborted (a fatal native error)",
            signal.SIGBUS: ", a bus error",
        }.get(signal.Signals(-exitcode) if name.startswith("SIG") else None, "")
        return f"exit code {exitcode} ({name}){hint}"
    return f"exit code {exitcode}"


def _child_trampoline(entry: str, conn: Connection, config: dict[str, Any]) -> None:
    """Spawned child's target: import ``module:function`` and hand it the pipe."""
    module_name, _, func_name = entry.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(conn, config)


class Runner:
    """One ComfyUI child process for one environment; runs one job at a time."""

    interrupt_kill_after_s = 1.5
    """How long an interrupted child may take to stop before it is killed."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.state = RunnerState.NEW
        self.ready: p.Ready | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    # ------------------------------------------------------------------ state

    def _transition(self, to: RunnerState) -> None:
        """The only place the state changes; refuses transitions the diagram lacks."""
        if to not in _TRANSITIONS[self.state]:
            raise RunnerStateError(f"runner cannot go from {self.state} to {to}")
        log.debug("runner %s -> %s", self.state, to)
        self.state = to

    def _require(self, *states: RunnerState) -> None:
        if self.state not in states:
            wanted = ", ".join(s.value for s in states)
            raise RunnerStateError(f"runner is {self.state.value}, needs {wanted}")

    @property
    def pid(self) -> int | None:
        """The child's pid while it exists."""
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, should_stop: Callable[[], bool] | None = None,
              poll_s: float = 0.1) -> p.Ready:
        """Spawn the child and wait until ComfyUI is initialised; raise RunnerStartFailed.

        ``should_stop`` is polled every ``poll_s``: once true the half-started child is
        killed and ``RunnerStartCanceled`` raised (a cancel must not wait for ComfyUI's
        import, which takes seconds to minutes).
        """
        self._require(RunnerState.NEW, RunnerState.DEFUNCT)
        if self.state is RunnerState.DEFUNCT:
            self.restarts += 1
        self._transition(RunnerState.STARTING)
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_child_trampoline,
            args=(self.config.child_entry, child_conn, asdict(self.config)),
            name=f"runflow-comfyui-{self.config.env_key[:12]}",
            daemon=True,
        )
        try:
            proc.start()
        except (OSError, RuntimeError) as exc:
            parent_conn.close()
            child_conn.close()
            self._transition(RunnerState.DEFUNCT)
            raise RunnerStartFailed(f"cannot spawn the ComfyUI process: {exc}") from exc
        finally:
            child_conn.close()  # so the parent sees EOF when the child dies
        self._proc, self._conn = proc, parent_conn
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill("startup timed out")
                raise RunnerStartFailed(
                    f"ComfyUI did not start within {self.config.startup_timeout_s:.0f} s"
                )
            if should_stop is not None and should_stop():
                self._kill("start canceled")
                raise RunnerStartCanceled("ComfyUI start was interrupted")
            msg = self._recv(timeout_s=min(remaining, poll_s))
            if msg is None:
                continue
            if isinstance(msg, p.Ready):
                self.ready = msg
                self._transition(RunnerState.READY)
                return msg
            if isinstance(msg, p.InitFailed):
                self._kill("init failed")
                raise RunnerStartFailed(msg.message, msg.traceback)
            if isinstance(msg, _ChildGone):
                self._mark_dead(msg.exit_text)
                raise RunnerStartFailed(f"ComfyUI process died while starting: {msg.exit_text}")
            log.debug("ignoring %r before Ready", msg)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to exit; kill it if it does not within ``timeout_s``."""
        if self._proc is None:
            if self.state is not RunnerState.DEFUNCT:
                self._transition(RunnerState.DEFUNCT)
            return
        try:
            if self._conn is not None and self.state in (RunnerState.READY, RunnerState.BUSY):
                self._conn.send(p.Shutdown())
        except (OSError, ValueError):
            pass
        self._proc.join(timeout_s)
        self._kill("stopped")

    def _kill(self, why: str) -> None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn = None, None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(10)
        if proc is not None:
            self.last_exit = describe_exit(proc.exitcode)
        if conn is not None:
            conn.close()
        if self.state is not RunnerState.DEFUNCT:
            self._transition(RunnerState.DEFUNCT)
        log.debug("runner child gone (%s): %s", why, self.last_exit)

    def _mark_dead(self, exit_text: str) -> None:
        self.last_exit = exit_text
        self._kill("died")
        self.last_exit = exit_text

    # ------------------------------------------------------------------ pipe

    def _recv(self, timeout_s: float) -> Any:
        """Next child message, None on timeout, or ``_ChildGone`` when the child died."""
        assert self._conn is not None and self._proc is not None
        ready = wait([self._conn, self._proc.sentinel], timeout=timeout_s)
        if not ready:
            return None
        if self._conn in ready or self._conn.poll():
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                return _ChildGone(describe_exit(self._proc.exitcode))
            if not isinstance(msg, p.CHILD_MESSAGES):
                raise ProtocolError(f"unexpected object from the child: {type(msg).__name__}")
            return msg
        self._proc.join(5)
        return _ChildGone(describe_exit(self._proc.exitcode))

    # ------------------------------------------------------------------ jobs

    def execute(
        self,
        job: p.Execute,
        *,
        on_event: Callable[[p.JobEvent], None] | None = None,
        should_interrupt: Callable[[], bool] | None = None,
        poll_s: float = 0.05,
    ) -> p.Done | p.Failed:
        """Run ``job`` and return its outcome; never raises for job failures.

        ``should_interrupt`` is polled every ``poll_s``; once true, the child is asked to
        interrupt and, failing that within ``interrupt_kill_after_s``, killed.
        """
        self._require(RunnerState.READY)
        assert self._conn is not None
        self._transition(RunnerState.BUSY)
        try:
            self._conn.send(job)
        except (OSError, ValueError) as exc:
            self._mark_dead(f"pipe broken ({exc})")
            return self._died(job, self.last_exit or "pipe broken")
        interrupted_at: float | None = None
        while True:
            if interrupted_at is None and should_interrupt is not None and should_interrupt():
                interrupted_at = time.monotonic()
                try:
                    self._conn.send(p.Interrupt(job.job_id))
                except (OSError, ValueError):
                    pass
            if interrupted_at is not None and (
                time.monotonic() - interrupted_at > self.interrupt_kill_after_s
            ):
                self._kill("did not honour interrupt")
                return p.Failed(job.job_id, p.FailureKind.INTERRUPTED,
                                "interrupted (the ComfyUI process was stopped)")
            try:
                msg = self._recv(timeout_s=poll_s)
            except ProtocolError:
                self._kill("protocol error")
                raise
            if msg is None:
                continue
            if isinstance(msg, _ChildGone):
                self._mark_dead(msg.exit_text)
                return self._died(job, msg.exit_text)
            if isinstance(msg, (p.Done, p.Failed)):
                if msg.job_id != job.job_id:
                    continue  # a late answer to an earlier, abandoned job
                self._transition(RunnerState.READY)
                return msg
            if isinstance(msg, (p.NodeStarted, p.Progress, p.Log)):
                if on_event is not None and msg.job_id == job.job_id:
                    on_event(msg)
                continue
            log.debug("ignoring %r while busy", msg)

    def _died(self, job: p.Execute, exit_text: str) -> p.Failed:
        return p.Failed(
            job.job_id, p.FailureKind.CHILD_DIED,
            f"the ComfyUI process died during the run: {exit_text}",
            details={"exit": exit_text},
        )


@dataclass(frozen=True)
class _ChildGone:
    """Internal: the child process ended (never sent over the pipe)."""

    exit_text: str


class RunnerSupervisor:
    """Keeps one warm runner; switching environment or a dead child restarts it."""

    def __init__(self) -> None:
        self.runner: Runner | None = None
        self.restarts = 0

    def runner_for(self, config: RunnerConfig,
                   should_stop: Callable[[], bool] | None = None) -> Runner:
        """A READY runner for ``config``, starting or restarting the child as needed."""
        runner = self.runner
        if runner is not None and runner.config != config:
            runner.stop()
            runner = self.runner = None
        if runner is None:
            runner = self.runner = Runner(config)
        if runner.state is RunnerState.DEFUNCT:
            self.restarts += 1
        if runner.state in (RunnerState.NEW, RunnerState.DEFUNCT):
            runner.start(should_stop)
        return runner

    def close(self) -> None:
        """Stop the child, if any."""
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
