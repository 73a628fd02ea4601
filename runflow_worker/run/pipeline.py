"""One run, phase by phase: validate, environment, models, inputs, execute, upload.

The environment phase (building the pinned environment, starting ComfyUI in it:
``run.envphase``) runs on its own thread at the same time as the models and inputs phases;
it returns what it produced, and execute waits for all three. What stops a phase becomes the
run's failure in one place (``run.failures``).

The pipeline knows nothing of Redis: its driver (the ``run`` CLI or the ``serve`` daemon)
passes a ``RunControl`` (why to stop, where events go) and gets a ``RunResult`` back. A
run never raises out of ``execute``: every outcome is a result with one status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runflow_worker.errors import (
    ErrorCode,
    RunFailure,
    RunInterrupted,
    RunRejected,
    RunReleased,
    WorkerUnfit,
)
from runflow_worker.run import contract as c
from runflow_worker.run.childconfig import start_prestart
from runflow_worker.run.config import PipelineConfig
from runflow_worker.run.envphase import (
    EnvironmentBuilder,
    EnvironmentOutcome,
    EnvironmentPhase,
    PreparedChild,
)
from runflow_worker.run.failures import (
    StopCheck,
    StopReason,
    check_stop,
    job_failure,
    run_failures,
)
from runflow_worker.run.fitness import disk_full_error, disk_problem
from runflow_worker.run.inputs import FileFetcher, materialise_inputs
from runflow_worker.run.modelfiles import (
    ModelStore,
    WantedBlob,
    fetch_blobs,
    link_blobs,
    wanted_blobs,
)
from runflow_worker.run.outputs import discard_outputs_later, store_outputs
from runflow_worker.run.rundirs import RunDirs, RunPaths
from runflow_worker.run.storage import LocalStorage, Storage
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.rewrite import inject_inputs
from runflow_worker.runtime.supervisor import RunnerSupervisor

log = logging.getLogger(__name__)


class RunControl(Protocol):
    """What a driver gives the pipeline for one run."""

    def stop_reason(self) -> StopReason | None:
        """Non-None once the run must stop (polled often: keep it cheap)."""

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Publish a ``progress`` or ``log`` event of this run."""

    def admit(self) -> None:
        """Return once the driver has begun the run; ``RunReleased`` when it must not run
        (the driver then ends the pickup itself). Called before the first model download,
        event or use of the ComfyUI child: what precedes it (the checks, the run's
        directories, the caller's files, the environment's start) overlaps the driver's
        begin (``serve.beginahead``)."""


@dataclass
class RunResult:
    """The outcome of one run, for the driver to record."""

    status: c.RunStatus
    output: c.RunOutput | None = None
    failure: RunFailure | None = None
    timings_ms: dict[str, int] = field(default_factory=dict)
    gpu_work: bool = False
    """False when the run was rejected before any GPU work (it bills 0)."""
    cold_start_s: float = 0.0
    gpu_model: str | None = None
    peak_vram_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def released(self) -> bool:
        """True when the run goes back to the queue unfinalised (``RunReleased``)."""
        return isinstance(self.failure, RunReleased)

    @property
    def unfit(self) -> str | None:
        """Why ComfyUI cannot start on this worker, when that (not the run) is at fault: the
        run is released and the worker counts it against its health (``run.fitness``)."""
        return self.failure.reason if isinstance(self.failure, WorkerUnfit) else None

    @property
    def oom(self) -> bool:
        """True when the run failed for lack of GPU memory."""
        return self.failure is not None and self.failure.code is ErrorCode.OUT_OF_MEMORY


class _Phases:
    """Times each phase into ``timings_ms`` (on the run's own thread)."""

    def __init__(self) -> None:
        self.timings_ms: dict[str, int] = {}

    def phase(self, name: str) -> _Phase:
        """A context that adds the time spent inside to phase ``name``."""
        return _Phase(self, name)

    def add(self, name: str, elapsed_ms: int) -> None:
        """Adds ``elapsed_ms`` (timed elsewhere: the environment thread) to phase ``name``."""
        self.timings_ms[name] = self.timings_ms.get(name, 0) + elapsed_ms


class _Phase:
    """One timed phase (``_Phases.phase``): a plain class, not a generator's context, as
    there are half a dozen on every run's path."""

    __slots__ = ("_phases", "_name", "_start")

    def __init__(self, phases: _Phases, name: str) -> None:
        self._phases = phases
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._phases.add(self._name, round((time.perf_counter() - self._start) * 1000))


class _EnvironmentWork(Protocol):
    """The environment phase under way: a future of its thread, or ``_Inline``."""

    def result(self) -> EnvironmentOutcome:
        """The phase's outcome (it never raises), waited for or computed now."""


class _Inline:
    """The environment phase done on the asking thread, at its first ``result``."""

    def __init__(self, work: Callable[[], EnvironmentOutcome]) -> None:
        self._work: Callable[[], EnvironmentOutcome] | None = work
        self._outcome: EnvironmentOutcome | None = None

    def result(self) -> EnvironmentOutcome:
        """The phase's outcome, computed at the first call."""
        if self._work is not None:
            self._outcome, self._work = self._work(), None
        assert self._outcome is not None
        return self._outcome


def _record_environment(result: RunResult, child: PreparedChild | None) -> None:
    """Puts what the environment phase produced (if anything) into the run's result."""
    if child is None:
        return
    result.cold_start_s = child.cold_start_s
    result.gpu_model = child.gpu_model
    result.environment.update(child.environment)
    result.warnings.extend(child.warnings)


class Pipeline:
    """Runs messages one at a time through a warm ComfyUI runner."""

    def __init__(self, config: PipelineConfig, *, storage: Storage,
                 supervisor: RunnerSupervisor | None = None,
                 blobs: ModelStore | None = None,
                 fetch_input: FileFetcher | None = None,
                 environments: EnvironmentBuilder | None = None,
                 run_dirs: RunDirs | None = None,
                 prestarter: futures.ThreadPoolExecutor | None = None) -> None:
        """``run_dirs`` and ``prestarter``: the run directories and the thread of a pre-start
        already under way on ``supervisor`` (``run.assembly``'s early start; the pipeline
        then owns them)."""
        self.config = config
        self.storage = storage
        self.supervisor = supervisor or RunnerSupervisor()
        self.blobs = blobs
        self.fetch_input = fetch_input
        self._run_dirs = run_dirs or RunDirs(config.work_dir)
        self._environment = EnvironmentPhase(config, self.supervisor, self._run_dirs,
                                             environments)
        self._starter = futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="environment")
        self._prestarter = prestarter

    @property
    def environments(self) -> EnvironmentBuilder | None:
        """The environment builder (``cache.environments.Environments``), or None: every run
        then needs ``RUNFLOW_COMFYUI_DIR``. Set after construction by ``run.assembly``."""
        return self._environment.environments

    @environments.setter
    def environments(self, builder: EnvironmentBuilder | None) -> None:
        self._environment.environments = builder

    def prestart(self) -> futures.Future[bool] | None:
        """Start the ComfyUI child the next run most likely needs, on a thread of its own,
        before any run arrives (``serve`` at boot); None when there is no guess.

        The guess: ``RUNFLOW_COMFYUI_DIR`` (every run uses it), else the most recently used
        prepared environment on the volume. The future's result says whether the child is
        READY; it never raises. A wrong guess, or a failed start, costs a run nothing but
        the wait for what is already under way (``RunnerSupervisor.prestart``).
        """
        try:
            config = self._environment.prestart_config()
        except Exception as exc:  # noqa: BLE001 - a guess must never stop the worker
            log.warning("no ComfyUI pre-start: %s", exc, extra={"event": "prestart_failed"})
            return None
        if config is None:
            return None
        self._prestarter, started = start_prestart(self.supervisor, config)
        return started

    def close(self) -> None:
        """Stop the ComfyUI child (or its pre-start) and let its environment go."""
        self._starter.shutdown(wait=True)
        self.supervisor.close()
        if self._prestarter is not None:
            self._prestarter.shutdown(wait=True)
        self._environment.close()
        if not self.config.keep_run_dirs:
            self._run_dirs.close()

    def tidy(self) -> None:
        """Start removing the last run's directories (on a background thread). A driver calls
        it once the run's outcome is written; without the call, the next run starts it and
        waits for its first step (``RunDirs.tidy``)."""
        self._run_dirs.tidy()

    def settle(self) -> None:
        """Wait until the directories of the runs that ended are removed (that happens on a
        background thread, after each run's result is handed back)."""
        self._run_dirs.quiesce()

    # ------------------------------------------------------------------ run

    def execute(self, message: c.RunMessage, control: RunControl, *,
                picked_up_monotonic: float | None = None) -> RunResult:
        """Run ``message`` to an outcome; never raises for run failures."""
        started = picked_up_monotonic if picked_up_monotonic is not None else time.monotonic()
        deadline = started + message.timeout_s if message.timeout_s else None
        phases = _Phases()
        result = RunResult(status=c.RunStatus.FAILED)

        def stop_reason() -> StopReason | None:
            reason = control.stop_reason()
            if reason is None and deadline is not None and time.monotonic() >= deadline:
                reason = StopReason.TIMEOUT
            return reason

        # The last run's directories are gone before anything of this one (or a child start)
        # happens: no run ever sees another's files. Usually long done by now.
        self._run_dirs.settle()
        run: RunPaths | None = None
        try:
            with phases.phase("validate"):
                defs = c.check_message(
                    message, allowed_origins=self.config.allowed_origins,
                    allow_local_files=self.config.allow_local_files,
                )
            check_stop(stop_reason)
            result.gpu_work = True
            run = self._run_dirs.create(message.run_id)
            # The environment (building it, starting ComfyUI in it: seconds to minutes on a
            # cold worker) is prepared on its own thread while models and inputs download.
            # It is always waited for, also when a download fails, so no start ever runs
            # into the next run; what it produced is recorded then, whatever the outcome.
            starting = self._start_environment(message, stop_reason)
            child: PreparedChild | None = None
            try:
                wf = message.workflow
                digests = [m.sha256.lower() for m in wf.models.values() if m.sha256] + [
                    r.sha256.lower() for r in wf.resources.values() if r.sha256
                ]
                pin = (self.blobs.pin(digests) if self.blobs is not None and digests
                       else nullcontext())
                with pin:
                    with phases.phase("models"):
                        wanted = self._fetch_models(message, run, control, stop_reason)
                    check_stop(stop_reason)
                    with phases.phase("inputs"):
                        values = c.resolved_values(message, defs)
                        files = self._fetch_inputs(defs, values, run.staged("input"),
                                                   stop_reason)
                        graph = inject_inputs(wf.workflow_json, values, files)
                    control.admit()
                    child = starting.result().prepared()
                    if child.pack_failure is not None:
                        raise child.pack_failure  # before any GPU work
                    check_stop(stop_reason)
                    with phases.phase("environment"):
                        child = self._environment.reacquire(child, wf.owner, stop_reason)
                    # Linked only now: the links directory is visible to the warm child,
                    # which until the runner was acquired may be another owner's.
                    if wanted:
                        assert self.blobs is not None
                        with phases.phase("models"):
                            link_blobs(self.blobs, wanted, run, wf.owner)
                    with phases.phase("execute"):
                        run.enter()
                        outcome = self._run_graph(child.runner, message, graph, run, control,
                                                  stop_reason)
            finally:
                produced = starting.result()  # the phase's outcome: it never raises
                phases.add("environment", produced.elapsed_ms)
                # The child as the run last saw it (restarted or not), else the thread's
                # (the run ended before it looked): its facts are the record's either way.
                _record_environment(result, child or produced.child)
            result.peak_vram_bytes = outcome.peak_vram_bytes
            if isinstance(outcome, p.Failed):
                raise job_failure(outcome, stop_reason())
            check_stop(stop_reason)
            with phases.phase("upload"):
                entries = self._upload(outcome.outputs, run, message.run_id, stop_reason)
            result.status = c.RunStatus.SUCCEEDED
            result.output = c.RunOutput(outputs=entries)
        except RunInterrupted as exc:
            result.failure = exc
            result.status = (c.RunStatus.CANCELED if exc.code is ErrorCode.CANCELED
                             else c.RunStatus.FAILED)
        except RunFailure as exc:
            result.failure = exc
            result.status = c.RunStatus.FAILED
            if isinstance(exc, RunRejected):
                result.gpu_work = False
        except Exception as exc:  # a bug: the run still reaches one terminal record
            if disk_full_error(exc):  # e.g. its run directory: the volume, not the run
                unfit = WorkerUnfit(disk_problem(self.config.work_dir, exc) or str(exc))
                result.failure = unfit
            else:
                log.exception("internal error in run %s", message.run_id)
                result.failure = RunFailure(ErrorCode.INTERNAL,
                                            f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if run is not None and not self.config.keep_run_dirs:
                self._run_dirs.discard(run)  # removed off the run's path (``tidy``)
        result.timings_ms = phases.timings_ms
        return result

    def _start_environment(self, message: c.RunMessage,
                           stop_reason: StopCheck) -> _EnvironmentWork:
        """The run's environment phase, started on its own thread; or, when the warm child
        already is the run's (``EnvironmentPhase.is_warm``), left for the run's own thread
        to do when it first asks: nothing to overlap then, and a second thread would only
        contend with the downloads' for the interpreter (``docs/serve.md``)."""
        if self._environment.is_warm(message):
            return _Inline(lambda: self._environment.run(message, stop_reason))
        return self._starter.submit(self._environment.run, message, stop_reason)

    def prepare(self, message: c.RunMessage, control: RunControl, *,
                models: bool = True) -> RunResult:
        """Ready a workflow without running it (``runflow-worker prepare``): its environment
        built and ComfyUI started in it, its custom nodes imported (a declared pack that
        fails, fails it), then with ``models`` its models and resources fetched into the
        store. Never raises for these failures: the result's status and failure say."""
        self._run_dirs.settle()  # as in execute: a child starts only once they are gone
        result = RunResult(status=c.RunStatus.FAILED)
        phases = _Phases()
        try:
            with phases.phase("environment"):
                child = self._environment.prepare(message, control.stop_reason)
            _record_environment(result, child)
            if child.pack_failure is not None:
                raise child.pack_failure
            if models:
                # The models land in the store (the run's dirs, never linked, go at once).
                run = self._run_dirs.create(message.run_id)
                try:
                    with phases.phase("models"):
                        self._fetch_models(message, run, control, control.stop_reason)
                finally:
                    run.remove()
            result.status = c.RunStatus.SUCCEEDED
        except RunFailure as exc:
            result.failure = exc
        result.timings_ms = phases.timings_ms
        return result

    # ------------------------------------------------------------------ phases

    def _fetch_models(self, message: c.RunMessage, run: RunPaths, control: RunControl,
                      stop_reason: StopCheck) -> list[WantedBlob]:
        """Fetch the run's missing blobs in parallel (``run.modelfiles``); they are linked
        once the run's own child is there."""
        wanted = wanted_blobs(message.workflow, run)
        if not wanted:
            return wanted
        control.admit()  # before any download (and its progress events)
        if self.blobs is None:
            raise RunFailure(ErrorCode.MODEL_FETCH_FAILED, "no model store configured")
        fields_of: dict[str, list[str]] = {}
        for w in wanted:
            fields_of.setdefault(w.sha256, []).append(w.field)

        def progress(sha: str, done: int, total: int | None) -> None:
            control.emit("progress", {"phase": "models", "sha256": sha,
                                      "fields": fields_of[sha], "bytes": done, "total": total})

        fetch_blobs(self.blobs, wanted, message.workflow.owner,
                    max_parallel=self.config.model_fetch_parallel, progress=progress,
                    stop_reason=stop_reason)
        return wanted

    def _upload(self, files: Any, run: RunPaths, run_id: str,
                stop_reason: StopCheck) -> list[c.OutputEntry]:
        """Store the outputs, stopping (between files and mid-transfer) like every phase.

        A run that does not succeed keeps no outputs: what was stored is deleted
        (best-effort, on a background thread: the terminal record does not wait for the
        storage), except on RELEASE, where the run is released (its next pickup writes the
        same keys) or another worker already holds it and may be writing them.
        """
        written: list[str] = []
        if isinstance(self.storage, LocalStorage) and self.storage.reserve is None:
            # Its new folders (the run's, its outputs') from the run directories' reserve:
            # the same volume as a rule (the rename falls back to mkdir where it is not).
            self.storage.reserve = self._run_dirs.reserve
        with run_failures(stop_reason):
            try:
                return store_outputs(files, run.dir("output"), run_id, self.storage,
                                     trusted_root=run.child_root,
                                     should_stop=lambda: stop_reason() is not None,
                                     written=written,
                                     keep_if_late=lambda: stop_reason() is StopReason.RELEASE)
            except BaseException:
                if written and stop_reason() is not StopReason.RELEASE:
                    discard_outputs_later(self.storage, written, run_id=run_id)
                raise

    def _fetch_inputs(self, defs: dict[str, c.InputDef], values: dict[str, Any],
                      input_dir: Path, stop_reason: StopCheck) -> dict[str, str]:
        if self.fetch_input is None:
            if any(d.type in (c.InputType.IMAGE, c.InputType.FILE) and k in values
                   for k, d in defs.items()):
                raise RunFailure(ErrorCode.INPUT_FETCH_FAILED, "no input fetcher configured")
            return {}
        with run_failures(stop_reason, ErrorCode.INPUT_FETCH_FAILED):
            return materialise_inputs(
                defs, values, input_dir, self.fetch_input,
                max_bytes=self.config.input_max_bytes,
                max_pixels=self.config.image_max_pixels,
                cancel=lambda: stop_reason() is not None,
                reserve=self._run_dirs.reserve,
            )

    def _run_graph(self, runner: Any, message: c.RunMessage, graph: dict[str, Any],
                   run: RunPaths, control: RunControl,
                   stop_reason: StopCheck) -> p.Done | p.Failed:
        job = p.Execute(
            job_id=f"{message.run_id}:{message.attempt}:{time.monotonic_ns()}",
            graph=graph,
            input_dir=str(run.dir("input")), output_dir=str(run.dir("output")),
            temp_dir=str(run.dir("temp")), models_dir=str(run.links / "models"),
            model_digests={k: m.sha256.lower() for k, m in message.workflow.models.items()
                           if m.sha256},
            resource_digests={k: r.sha256.lower() for k, r in message.workflow.resources.items()
                              if r.sha256},
        )

        def on_event(ev: p.JobEvent) -> None:
            if isinstance(ev, p.NodeStarted):
                control.emit("progress", {"phase": "execute", "node_id": ev.node_id,
                                          "node_type": ev.node_type})
            elif isinstance(ev, p.Progress):
                control.emit("progress", {"phase": "execute", "node_id": ev.node_id,
                                          "step": ev.value, "total": ev.total})
            else:
                control.emit("log", {"node_id": ev.node_id, "message": ev.text})

        return runner.execute(job, on_event=on_event,
                              should_interrupt=lambda: stop_reason() is not None)
