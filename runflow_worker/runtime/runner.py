"""The runner: supervises one spawned ComfyUI child per environment, joined by a channel.

States (one transition function, ``_transition``, checks every change)::

    NEW -> STARTING -> READY <-> BUSY
              |          |        |
              +------> DEFUNCT <--+      DEFUNCT -> STARTING (restart)

A child that dies becomes a readable failure ("exit code -9 (SIGKILL), probably out of
memory"), never a hang: the parent waits on the channel *and* the process's pidfd (which a
process the child forked does not hold open); a child found dead while idle is restarted
before the next job. Killing the child kills its process group, so nothing it forked
outlives it. An interrupt that the child does not honour within ``interrupt_kill_after_s``
kills it, so a cancel or timeout always lands in bounded time; messages to the child are
written from a helper thread, so a child that stops reading cannot block the supervising
thread either.

The child runs custom-node code, so everything it sends is untrusted (SPEC section 9): the
channel carries JSON frames only (``runtime.wire``), each checked against the closed schema
of ``runtime.protocol`` before it becomes a message. A protocol violation (a bad length, an
oversized frame, bytes that are not UTF-8 JSON, an unknown type, wrong fields, a message
for another job or out of turn, a channel closed by a living child) kills the child; the
job fails with ``INTERNAL`` ("protocol violation from the ComfyUI process: ..."), a start
fails with ``RunnerStartFailed``, and the next run starts a fresh child. The runner is never
left BUSY.

The child is started by ``runtime.spawn`` with a scrubbed environment (no credentials);
its output is re-emitted as log records tagged with the job running (``runtime.logrelay``).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from multiprocessing.connection import wait
from typing import Any

from runflow_worker.cache.commands import child_environment
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import (
    ProtocolError,
    RunnerStartCanceled,
    RunnerStartFailed,
    RunnerStateError,
)
from runflow_worker.runtime.sandbox import SandboxPlan, command_prefix, scratch_layer_problems
from runflow_worker.runtime.spawn import ChildProcess, spawn
from runflow_worker.runtime.wire import Channel, ChannelClosed, WireError, readable

log = logging.getLogger(__name__)

VIOLATION = "protocol violation from the ComfyUI process"


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
    # No defaults: the caller's settings hold them (``RUNFLOW_STARTUP_TIMEOUT_S``,
    # ``RUNFLOW_RUNNER_ENTRY``), which this layer cannot import.
    startup_timeout_s: float = field(kw_only=True)
    """How long the child may take to import ComfyUI and load its nodes."""
    child_entry: str = field(kw_only=True)
    """``module:function`` run in the child; tests swap in a fake child here."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the child."""
    env_pass: tuple[str, ...] = ()
    """Variables of the worker's environment the child gets although the credential scrub
    would drop them (``RUNFLOW_CHILD_ENV_PASS``, e.g. ``HF_TOKEN``)."""
    sandbox: SandboxPlan | None = None
    """The child's sandbox (``runtime.sandbox``): its own paths; the environment's
    (``comfyui_dir``, ``custom_node_dirs``, ``extra_sys_path``) are added at start. None
    runs the child unconfined (``RUNFLOW_SANDBOX=none``)."""

    custom_code: bool = True
    """The child loads custom nodes (code of a stranger), so ``RunnerSupervisor`` lets it
    serve one owner only; False where it loads ComfyUI and the project's node pack alone.
    True unless the caller knows better: a wrong False would share hostile code."""


def sandbox_plan(config: RunnerConfig) -> SandboxPlan | None:
    """The child's full sandbox: the config's plan plus its environment, read-only, with a
    scratch layer over ComfyUI's checkout and every custom node directory outside it."""
    plan = config.sandbox
    if plan is None:
        return None
    env_dirs = (config.comfyui_dir, *config.custom_node_dirs, *config.extra_sys_path)
    entry_module = config.child_entry.partition(":")[0].split(".")[0]
    return replace(plan, read_only=(*plan.read_only, *env_dirs),
                   scratch_layers=(*plan.scratch_layers, config.comfyui_dir,
                                   *config.custom_node_dirs),
                   modules=(*plan.modules, entry_module))


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
        self._proc: ChildProcess | None = None
        self._conn: Channel | None = None
        self._sender: _Sender | None = None
        self._job_id: str | None = None
        """The job running now (what the child's log lines are tagged with)."""
        self.spawned = threading.Event()
        """Set once the child process exists (a waiter's event: ``pid`` is set then)."""

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
        env = child_environment(os.environ, self.config.env_pass, self.config.env)
        log.debug("ComfyUI child environment: dropped %s",
                  ", ".join(sorted(set(os.environ) - set(env))) or "nothing")
        try:
            prefix = self._sandbox_prefix(env)
            self._proc, self._conn = spawn(self.config.child_entry, asdict(self.config), env,
                                           argv_prefix=prefix, job_of=lambda: self._job_id)
            self.spawned.set()
        except Exception as exc:  # never stay STARTING
            self._transition(RunnerState.DEFUNCT)
            raise RunnerStartFailed(f"cannot spawn the ComfyUI process: {exc}") from exc
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
            try:
                msg = self._recv(timeout_s=min(remaining, poll_s))
                if msg is not None and not isinstance(msg, (p.Ready, p.InitFailed, _ChildGone)):
                    raise ProtocolError(f"{type(msg).__name__} before Ready")
            except ProtocolError as exc:  # never stay STARTING
                self._violated(str(exc))
                raise RunnerStartFailed(f"{VIOLATION}: {exc}") from exc
            if msg is None:
                continue
            if isinstance(msg, p.Ready):
                self.ready = msg
                self._transition(RunnerState.READY)
                return msg
            if isinstance(msg, p.InitFailed):
                self._kill("init failed")
                raise RunnerStartFailed(msg.message, msg.traceback)
            self._mark_dead(msg.exit_text)
            raise RunnerStartFailed(f"ComfyUI process died while starting: {msg.exit_text}")

    def _exit_text(self, proc: ChildProcess) -> str:
        """``describe_exit`` of the child; in the sandbox, bwrap reports a child killed by
        signal N as exit code 128 + N, told as the signal it was."""
        code = proc.exitcode
        if self.config.sandbox is not None and code is not None and 128 < code < 160:
            code = 128 - code
        return describe_exit(code)

    def _sandbox_prefix(self, env: dict[str, str]) -> list[str]:
        """The sandbox's command line, after emptying the child's own directories (nothing
        a previous child left there may reach this one)."""
        plan = sandbox_plan(self.config)
        if plan is None:
            return []
        for path in plan.fresh:
            _empty_dir(path)
        for problem in scratch_layer_problems(plan):
            log.warning("no scratch layer over %s: it stays read-only to custom nodes",
                        problem, extra={"event": "sandbox_no_scratch"})
        return command_prefix(plan, env)

    def notice_death(self) -> bool:
        """True when the child of this READY runner died while idle; it is DEFUNCT then.

        The exit description ("exit code -9 (SIGKILL), probably out of memory ...") is kept
        in ``last_exit`` and logged; the caller restarts the child before the next job.
        """
        if self.state is not RunnerState.READY or self._proc is None:
            return False
        if not self._proc.exited():
            return False
        self._proc.join(5)
        exit_text = self._exit_text(self._proc)
        log.warning("the idle ComfyUI process died (%s); it is restarted for the next run",
                    exit_text)
        self._mark_dead(exit_text)
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to exit; kill it if it does not within ``timeout_s``."""
        if self._proc is None:
            if self.state is not RunnerState.DEFUNCT:
                self._transition(RunnerState.DEFUNCT)
            return
        if self._conn is not None and self.state in (RunnerState.READY, RunnerState.BUSY):
            if self._sender is None:
                self._sender = _Sender(self._conn)
            self._sender.send(p.Shutdown())
        self._proc.join(timeout_s)
        self._kill("stopped")

    def _kill(self, why: str) -> None:
        proc, conn, sender = self._proc, self._conn, self._sender
        self._proc, self._conn, self._sender = None, None, None
        if proc is not None:
            proc.kill()
            proc.join(10)
            self.last_exit = self._exit_text(proc)
        # The child is gone, so a write blocked on it fails now and its thread ends. Were it
        # still blocked (something else holds the child's end), the connection stays open:
        # closing an fd under a writing thread could let the write land in whatever file
        # gets that fd number next.
        if sender is not None and not sender.close(timeout_s=5):
            log.warning("a write to the stopped ComfyUI process is still blocked")
        elif conn is not None:
            conn.close()
        if proc is not None:
            proc.close()
        if self.state is not RunnerState.DEFUNCT:
            self._transition(RunnerState.DEFUNCT)
        log.debug("runner child gone (%s): %s", why, self.last_exit)

    def _mark_dead(self, exit_text: str) -> None:
        self.last_exit = exit_text
        self._kill("died")
        self.last_exit = exit_text

    def _violated(self, why: str) -> None:
        log.error("%s: %s; it is stopped", VIOLATION, why,
                  extra={"event": "child_protocol_violation"})
        self._kill("protocol violation")

    # ------------------------------------------------------------------ channel

    def _recv(self, timeout_s: float) -> Any:
        """Next child message, None on timeout, or ``_ChildGone`` when the child died.

        Raises ProtocolError when what came is not a protocol message (the caller kills the
        child).
        """
        assert self._conn is not None and self._proc is not None
        conn, proc = self._conn, self._proc
        # A bare poll (``wire.readable``): ``multiprocessing``'s ``wait`` builds a selector
        # per call, and this runs for every message of every run.
        if not conn.buffered and not readable([conn.fileno(), proc.sentinel], timeout_s):
            return None
        # The channel first: a last message the child wrote just before it died counts.
        try:
            obj = conn.recv(timeout_s=0)
        except ChannelClosed:
            obj = None
        except WireError as exc:
            if conn.eof and self._gone_within(2.0):
                return _ChildGone(self._exit_text(proc))  # killed mid-frame
            raise ProtocolError(str(exc)) from exc
        if obj is not None:
            try:
                return p.child_message(obj)
            except ProtocolError:
                raise
            except Exception as exc:  # whatever the child sent, never a crash
                raise ProtocolError(f"undecodable message ({type(exc).__name__})") from exc
        if conn.eof:
            # The child's end closes as it exits, a moment before its pidfd fires; a child
            # that lives on without its channel broke the protocol.
            if not self._gone_within(2.0):
                raise ProtocolError("the ComfyUI process closed its channel")
            return _ChildGone(self._exit_text(proc))
        if proc.exited():
            proc.join(5)
            return _ChildGone(self._exit_text(proc))
        return None  # part of a frame so far

    def _gone_within(self, timeout_s: float) -> bool:
        assert self._proc is not None
        if not wait([self._proc.sentinel], timeout=timeout_s):
            return False
        self._proc.join(5)
        return True

    # ------------------------------------------------------------------ jobs

    def execute(
        self,
        job: p.Execute,
        *,
        on_event: Callable[[p.JobEvent], None] | None = None,
        should_interrupt: Callable[[], bool] | None = None,
        poll_s: float = 0.05,
    ) -> p.Done | p.Failed:
        """Run ``job`` and return its outcome; never raises for job or channel failures.

        ``should_interrupt`` is polled every ``poll_s``; once true, the child is asked to
        interrupt and, failing that within ``interrupt_kill_after_s``, killed. Should
        ``on_event`` or ``should_interrupt`` raise, the child is killed (the runner is never
        left BUSY) and the exception propagates.
        """
        self._require(RunnerState.READY)
        assert self._conn is not None and self._proc is not None
        self._transition(RunnerState.BUSY)
        if self._proc.exited():  # died while idle, after runner_for looked
            self._proc.join(5)
            exit_text = self._exit_text(self._proc)
            self._mark_dead(exit_text)
            return self._died(job, exit_text, when="before the run started")
        self._set_job(job.job_id)
        sender = self._sender = _Sender(self._conn)
        sender.send(job)
        try:
            outcome = self._supervise(job, sender, on_event, should_interrupt, poll_s)
        except BaseException:
            if self.state is RunnerState.BUSY:
                self._kill("the supervising call raised")
            raise
        finally:
            self._set_job(None)
        if self._sender is sender:  # still READY: every message went through
            self._sender = None
            sender.close(timeout_s=5)
        return outcome

    def _supervise(self, job: p.Execute, sender: _Sender,
                   on_event: Callable[[p.JobEvent], None] | None,
                   should_interrupt: Callable[[], bool] | None,
                   poll_s: float) -> p.Done | p.Failed:
        interrupted_at: float | None = None
        while True:
            if interrupted_at is None and should_interrupt is not None and should_interrupt():
                interrupted_at = time.monotonic()
                # Queued behind the job: sent once the job is through, never interleaved.
                sender.send(p.Interrupt(job.job_id))
            if interrupted_at is not None and (
                time.monotonic() - interrupted_at > self.interrupt_kill_after_s
            ):
                self._kill("did not honour interrupt")
                return p.Failed(job.job_id, p.FailureKind.INTERRUPTED,
                                "interrupted (the ComfyUI process was stopped)")
            if sender.error is not None:
                return self._send_failed(job, sender.error)
            try:
                msg = self._recv(timeout_s=poll_s)
                if isinstance(msg, (p.Ready, p.InitFailed)):
                    raise ProtocolError(f"{type(msg).__name__} while a job runs")
                if msg is not None and not isinstance(msg, _ChildGone) and (
                        msg.job_id != job.job_id):
                    # Every job before this one ended with its answer: nothing else is due.
                    raise ProtocolError(f"{type(msg).__name__} for another job "
                                        f"({msg.job_id[:60]!r})")
            except ProtocolError as exc:  # never stay BUSY
                return self._violation(job, str(exc))
            if msg is None:
                continue
            if isinstance(msg, _ChildGone):
                self._mark_dead(msg.exit_text)
                return self._died(job, msg.exit_text)
            if isinstance(msg, (p.Done, p.Failed)):
                self._transition(RunnerState.READY)
                return msg
            if on_event is not None:
                on_event(msg)

    def _send_failed(self, job: p.Execute, exc: BaseException) -> p.Failed:
        assert self._proc is not None
        if isinstance(exc, OSError) and wait([self._proc.sentinel], timeout=5):
            # A broken channel is the child's death seen from the writing side.
            self._proc.join(5)
            exit_text = self._exit_text(self._proc)
            self._mark_dead(exit_text)
            return self._died(job, exit_text)
        return self._lost(job, f"cannot send it the job ({type(exc).__name__}: {exc})")

    def _violation(self, job: p.Execute, why: str) -> p.Failed:
        """Kill the child that broke the protocol; the job fails with INTERNAL."""
        self._violated(why)
        return p.Failed(
            job.job_id, p.FailureKind.INTERNAL,
            f"{VIOLATION}: {why}; it was stopped and starts afresh for the next run",
            details={"exit": self.last_exit},
        )

    def _set_job(self, job_id: str | None) -> None:
        self._job_id = job_id
        if self._proc is not None:
            self._proc.output.job_changed()

    def _lost(self, job: p.Execute, what: str) -> p.Failed:
        """Kill the child after a channel failure; the job fails with INTERNAL."""
        log.error("lost the ComfyUI process: %s", what)
        self._kill("channel failure")
        return p.Failed(
            job.job_id, p.FailureKind.INTERNAL,
            f"lost the ComfyUI process: {what}; it was stopped and starts afresh for the "
            f"next run", details={"exit": self.last_exit},
        )

    def _died(self, job: p.Execute, exit_text: str, when: str = "during the run") -> p.Failed:
        return p.Failed(
            job.job_id, p.FailureKind.CHILD_DIED,
            f"the ComfyUI process died {when}: {exit_text}",
            details={"exit": exit_text},
        )


class _Sender:
    """Writes messages to the child, in order, never blocking the supervising thread.

    A message the socket takes whole is written directly (a job, an interrupt: the usual
    case, and no thread to start and join per run). Once one is not taken whole, its rest
    and every later message go through a thread of their own. Why a thread then: a socket
    write blocks while the child does not read (a wedged child, a graph larger than the
    socket buffer), and the supervising thread must keep watching the interrupt, the
    timeout and the child's pidfd meanwhile.
    """

    def __init__(self, conn: Channel) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: BaseException | None = None
        """The first failed write (later messages are dropped)."""
        self._thread: threading.Thread | None = None
        # ``stop`` may send from another thread than the supervising one: one writer at a
        # time, or two frames could interleave on the socket.
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        """Write ``msg`` now or queue it; it is written after every message sent before it."""
        with self._lock:
            self._send_locked(msg)

    def _send_locked(self, msg: Any) -> None:
        if self._thread is not None:
            self._queue.put(msg)
            return
        if self.error is not None:
            return
        try:
            rest = self._conn.send_nowait(p.to_wire(msg))
        except BaseException as exc:  # noqa: BLE001 - seen by the supervising thread
            self.error = exc
            return
        if rest:
            self._queue.put(rest)  # the frame's rest first, then whatever follows
            self._thread = threading.Thread(target=self._run, name="runflow-runner-send",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout_s: float) -> bool:
        """End the thread once the queue is written; True when it ended within ``timeout_s``
        (or never had to start)."""
        with self._lock:
            if self._thread is None:
                return True
            self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                if isinstance(msg, bytes):
                    self._conn.send_bytes(msg)
                else:
                    self._conn.send(p.to_wire(msg))
            except BaseException as exc:  # noqa: BLE001 - handed to the supervising thread
                self.error = exc


def _empty_dir(path: str) -> None:
    """Make ``path`` a new empty directory, whatever a previous child left in it.

    The old one is renamed aside first: a child may have left directories it made
    unreadable, which a removal in place would skip, and the next child must find none of
    it. What cannot be removed stays aside, out of any sandbox's view, until the run
    directories' owner is removed.
    """
    if os.path.lexists(path):
        aside = f"{path}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(path, aside)

        def writable_again(func: Any, name: str, _exc: Any) -> None:
            try:
                os.chmod(os.path.dirname(name), 0o700)
                if not os.path.islink(name):  # chmod follows a link: to a file of the worker
                    os.chmod(name, 0o700)
                func(name)
            except OSError:
                pass

        shutil.rmtree(aside, onerror=writable_again)
    os.makedirs(path, exist_ok=True)  # the pipeline may have made it meanwhile


@dataclass(frozen=True)
class _ChildGone:
    """Internal: the child process ended (never sent over the channel)."""

    exit_text: str
