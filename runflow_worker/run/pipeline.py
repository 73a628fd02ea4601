"""One run, phase by phase: validate, environment, models, inputs, execute, upload.

The environment phase (building the pinned environment, starting ComfyUI in it) runs on its
own thread at the same time as the models and inputs phases; execute waits for all three.

The pipeline knows nothing of Redis: its driver (the ``run`` CLI or the ``serve`` daemon)
passes a ``RunControl`` (why to stop, where events go) and gets a ``RunResult`` back. A
run never raises out of ``execute``: every outcome is a result with one status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from runflow_worker.errors import ErrorCode, RunFailure, RunInterrupted, RunRejected, WorkerUnfit
from runflow_worker.run import contract as c
from runflow_worker.run.envreport import EnvironmentReport
from runflow_worker.run.fitness import (
    checkout_problem,
    disk_full_error,
    disk_problem,
    start_failure_cause,
)
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
from runflow_worker.run.storage import Storage, UploadCanceled
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.customnodes import loads_custom_nodes
from runflow_worker.runtime.errors import RunnerStartCanceled, RunnerStartFailed
from runflow_worker.runtime.rewrite import inject_inputs
from runflow_worker.runtime.runner import RunnerConfig
from runflow_worker.runtime.sandbox import SandboxPlan
from runflow_worker.runtime.supervisor import RunnerLease, RunnerSupervisor

log = logging.getLogger(__name__)


class StopReason(StrEnum):
    """Why a driver wants the current run to stop."""

    CANCELED = "canceled"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    """Graceful shutdown ran out of time: release the run to the queue, do not finalise."""


class RunControl(Protocol):
    """What a driver gives the pipeline for one run."""

    def stop_reason(self) -> StopReason | None:
        """Non-None once the run must stop (polled often: keep it cheap)."""

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Publish a ``progress`` or ``log`` event of this run."""


class EnvironmentBuilder(Protocol):
    """What the pipeline needs of ``cache.environments.Environments``."""

    def prepare(self, spec: Any, *, cancel: Callable[[], bool] | None = None) -> Any: ...

    def pin(self, key: str) -> Any: ...


@dataclass
class RunResult:
    """The outcome of one run, for the driver to record."""

    status: c.RunStatus
    output: c.RunOutput | None = None
    failure: RunFailure | None = None
    timings_ms: dict[str, int] = field(default_factory=dict)
    gpu_work: bool = False
    """False when the run was rejected before any GPU work (it bills 0)."""
    release: bool = False
    """True when the run must go back to the queue unfinalised (shutdown, ``unfit``)."""
    unfit: str | None = None
    """Why ComfyUI cannot start on this worker, when that (not the run) is at fault: the
    run is released and the worker counts it against its health (``run.fitness``)."""
    cold_start_s: float = 0.0
    gpu_model: str | None = None
    peak_vram_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def oom(self) -> bool:
        """True when the run failed for lack of GPU memory."""
        return self.failure is not None and self.failure.code is ErrorCode.OUT_OF_MEMORY


@dataclass(frozen=True)
class PipelineConfig:
    """Plain settings of the pipeline (built from the worker settings)."""

    work_dir: Path
    """Parent of the per-run directories."""
    comfyui_dir: Path | None
    cpu: bool | None = None
    allowed_origins: tuple[str, ...] = ()
    allow_local_files: bool = False
    input_max_bytes: int = 100 * 2**20
    image_max_pixels: int = 64 * 2**20
    child_entry: str = "runflow_worker.runtime.child:main"
    startup_timeout_s: float = 600.0
    keep_run_dirs: bool = False
    extra_custom_node_dirs: tuple[Path, ...] = ()
    model_fetch_parallel: int = 4
    """Downloads of one run's missing blobs at a time."""
    run_install_scripts: bool = False
    """Environments run their custom nodes' ``install.py`` (part of the environment key)."""
    child_env_pass: tuple[str, ...] = ()
    """Variables the ComfyUI child gets despite the credential scrub (``HF_TOKEN``...)."""
    sandbox: bool = True
    """Run the ComfyUI child in the bubblewrap sandbox (``RUNFLOW_SANDBOX=bwrap``)."""
    child_network: bool = False
    """The sandboxed child shares the worker's network (``RUNFLOW_CHILD_NETWORK=host``)."""
    sandbox_read_only: tuple[Path, ...] = ()
    """Extra paths the sandboxed child may read (tests: their fake child's code)."""
    sandbox_hidden: tuple[Path, ...] = ()
    """Paths the sandboxed child never sees although a path it reads contains them (the
    cache volume); the run's own directories are shown again inside them."""


_FAILURE_CODES = {
    p.FailureKind.INVALID_WORKFLOW: ErrorCode.INVALID_WORKFLOW,
    p.FailureKind.NODE_ERROR: ErrorCode.NODE_ERROR,
    p.FailureKind.OUT_OF_MEMORY: ErrorCode.OUT_OF_MEMORY,
    p.FailureKind.CHILD_DIED: ErrorCode.INTERNAL,
    p.FailureKind.INTERNAL: ErrorCode.INTERNAL,
}


class _Phases:
    """Times each phase into ``timings_ms``."""

    def __init__(self) -> None:
        self.timings_ms: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[name] = self.timings_ms.get(name, 0) + round(
                (time.perf_counter() - start) * 1000
            )


class Pipeline:
    """Runs messages one at a time through a warm ComfyUI runner."""

    def __init__(self, config: PipelineConfig, *, storage: Storage,
                 supervisor: RunnerSupervisor | None = None,
                 blobs: ModelStore | None = None,
                 fetch_input: FileFetcher | None = None,
                 environments: EnvironmentBuilder | None = None) -> None:
        self.config = config
        self.storage = storage
        self.supervisor = supervisor or RunnerSupervisor()
        self.blobs = blobs
        self.fetch_input = fetch_input
        self.environments = environments
        self._starter = futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="environment")
        self._prestarter: futures.ThreadPoolExecutor | None = None
        # Pins of the environments this worker uses (by key): the warm child's, and the
        # one being prepared, so no gc on the volume removes them meanwhile.
        self._env_pins: dict[str, ExitStack] = {}
        self._run_dirs = RunDirs(config.work_dir)
        self._report = EnvironmentReport()
        self._commits: dict[Path, str | None] = {}

    def prestart(self) -> futures.Future[bool] | None:
        """Start the ComfyUI child the next run most likely needs, on a thread of its own,
        before any run arrives (``serve`` at boot); None when there is no guess.

        The guess: ``RUNFLOW_COMFYUI_DIR`` (every run uses it), else the most recently used
        prepared environment on the volume. The future's result says whether the child is
        READY; it never raises. A wrong guess, or a failed start, costs a run nothing but
        the wait for what is already under way (``RunnerSupervisor.prestart``).
        """
        try:
            config = self._prestart_config()
        except Exception as exc:  # noqa: BLE001 - a guess must never stop the worker
            log.warning("no ComfyUI pre-start: %s", exc, extra={"event": "prestart_failed"})
            return None
        if config is None:
            return None
        self._prestarter = futures.ThreadPoolExecutor(max_workers=1,
                                                      thread_name_prefix="prestart")
        return self._prestarter.submit(self.supervisor.prestart, config)

    def _prestart_config(self) -> RunnerConfig | None:
        if self.config.comfyui_dir is not None:
            if checkout_problem(self.config.comfyui_dir) is not None:
                return None  # the first run reports it (the worker is unfit)
            return self._runner_config(self.config.comfyui_dir, "baked", (),
                                       declares_nodes=False)
        most_recent = getattr(self.environments, "most_recent", None)
        env = most_recent() if most_recent is not None else None
        if env is None:
            return None
        self._pin_environment(env.key)  # until a run switches away from it
        return self._runner_config(env.comfyui_dir, env.key,
                                   tuple(str(p) for p in env.sys_path), declares_nodes=False)

    def close(self) -> None:
        """Stop the ComfyUI child (or its pre-start) and let its environment go."""
        self._starter.shutdown(wait=True)
        self.supervisor.close()
        if self._prestarter is not None:
            self._prestarter.shutdown(wait=True)
        self._unpin_environments(keep=None)
        if not self.config.keep_run_dirs:
            self._run_dirs.close()

    def settle(self) -> None:
        """Wait until the directories of the runs that ended are removed (that happens on a
        background thread, after each run's result is handed back)."""
        self._run_dirs.settle()

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
            self._check_stop(stop_reason)
            result.gpu_work = True
            run = self._run_dirs.create(message.run_id)
            # The environment (building it, starting ComfyUI in it: seconds to minutes on a
            # cold worker) is prepared on its own thread while models and inputs download.
            # It is always waited for, also when a download fails, so no start ever runs
            # into the next run.
            starting = self._starter.submit(self._prepare_runner, message, result,
                                            stop_reason, phases)
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
                    self._check_stop(stop_reason)
                    with phases.phase("inputs"):
                        values = c.resolved_values(message, defs)
                        files = self._fetch_inputs(defs, values, run.staged("input"),
                                                   stop_reason)
                        graph = inject_inputs(wf.workflow_json, values, files)
                    runner = starting.result()
                    self._check_stop(stop_reason)
                    with phases.phase("environment"):
                        runner = self._restart_if_died(runner, wf.owner, result,
                                                       stop_reason)
                    # Linked only now: the links directory is visible to the warm child,
                    # which until the runner was acquired may be another owner's.
                    if wanted:
                        assert self.blobs is not None
                        with phases.phase("models"):
                            link_blobs(self.blobs, wanted, run, wf.owner)
                    with phases.phase("execute"):
                        run.enter()
                        outcome = self._run_graph(runner, message, graph, run, control,
                                                  stop_reason)
            finally:
                futures.wait([starting])
            result.peak_vram_bytes = outcome.peak_vram_bytes
            if isinstance(outcome, p.Failed):
                raise self._failure_from(outcome, stop_reason())
            self._check_stop(stop_reason)
            with phases.phase("upload"):
                entries = self._upload(outcome.outputs, run, message.run_id, stop_reason)
            result.status = c.RunStatus.SUCCEEDED
            result.output = c.RunOutput(outputs=entries)
        except RunInterrupted as exc:
            result.failure = exc
            result.release = exc.release
            result.unfit = exc.reason if isinstance(exc, WorkerUnfit) else None
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
                result.failure, result.release, result.unfit = unfit, True, unfit.reason
            else:
                log.exception("internal error in run %s", message.run_id)
                result.failure = RunFailure(ErrorCode.INTERNAL,
                                            f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if run is not None and not self.config.keep_run_dirs:
                self._run_dirs.discard(run)  # removed off the run's path
        result.timings_ms = phases.timings_ms
        return result

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
                self._runner(message, result, control.stop_reason)
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

    def _restart_if_died(self, runner: Any, owner: str | None, result: RunResult,
                         stop_reason: Callable[[], StopReason | None]) -> Any:
        """``runner``, or a fresh one when its child died while models and inputs downloaded.

        The environment phase ends with a READY runner, but the downloads after it can take
        minutes, and the idle child may die meanwhile (the OOM killer): that is a cold start
        of this run, not its failure.
        """
        if not runner.notice_death():
            return runner
        start = time.monotonic()
        lease = self._start_runner(runner.config, owner, stop_reason)
        result.cold_start_s += time.monotonic() - start
        return lease.runner

    def _start_runner(self, config: RunnerConfig, owner: str | None,
                      stop_reason: Callable[[], StopReason | None]) -> RunnerLease:
        """``supervisor.acquire``; a failed or canceled start releases the pins and
        becomes the run's outcome."""
        try:
            return self.supervisor.acquire(config, owner=owner,
                                           should_stop=lambda: stop_reason() is not None)
        except RunnerStartCanceled as exc:
            self._unpin_environments(keep=None)
            raise _interrupted(stop_reason() or StopReason.CANCELED) from exc
        except RunnerStartFailed as exc:
            self._unpin_environments(keep=None)
            cause = start_failure_cause(config, self.config.work_dir,
                                        self.config.comfyui_dir, exc)
            if cause is not None:
                raise WorkerUnfit(cause) from exc
            raise RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                             f"ComfyUI failed to start: {exc}",
                             details={"traceback": exc.traceback[-4000:]}) from exc

    def _prepare_runner(self, message: c.RunMessage, result: RunResult,
                        stop_reason: Callable[[], StopReason | None], phases: _Phases) -> Any:
        with phases.phase("environment"):
            return self._runner(message, result, stop_reason)

    @staticmethod
    def _check_stop(stop_reason: Callable[[], StopReason | None]) -> None:
        reason = stop_reason()
        if reason is not None:
            raise _interrupted(reason)

    def _runner(self, message: c.RunMessage, result: RunResult,
                stop_reason: Callable[[], StopReason | None]) -> Any:
        # RUNFLOW_COMFYUI_DIR overrides: every run uses that checkout. Without it, each run
        # gets the environment its workflow pins, built once per environment key.
        if self.config.comfyui_dir is not None:
            missing = checkout_problem(self.config.comfyui_dir)
            if missing is not None:  # no start to try: every run would fail the same way
                raise WorkerUnfit(missing)
            comfyui_dir, env_key, sys_path = self.config.comfyui_dir, "baked", ()
        else:
            env = self._prepare_environment(message, stop_reason)
            comfyui_dir, env_key = env.comfyui_dir, env.key
            sys_path = tuple(str(p) for p in env.sys_path)
            # Checked out at the pinned commit by the worker itself; its .git is what the
            # build's code left, so no git of the worker's ever reads it (a ref linked to a
            # worker's file would put that file into the record).
            self._commits[comfyui_dir] = (message.workflow.environment.comfyui.commit
                                          or "").lower() or None
        config = self._runner_config(comfyui_dir, env_key, sys_path,
                                     declares_nodes=bool(message.workflow.custom_nodes))
        start = time.monotonic()
        lease = self._start_runner(config, message.workflow.owner, stop_reason)
        runner = lease.runner
        # The previous environment's child is gone now: its pin can go too.
        self._unpin_environments(keep=env_key)
        if lease.started:  # a first start, an owner or environment switch, a restart
            result.cold_start_s = time.monotonic() - start
        if runner.ready is not None:
            result.gpu_model = runner.ready.gpu_model
        environment, warnings = self._report.describe(message, config,
                                                      self._checked_ready(runner.ready,
                                                                          comfyui_dir),
                                                      comfyui_dir)
        result.environment.update(environment)
        result.warnings.extend(warnings)
        broken = self._report.pack_failure(message, runner.ready)
        if broken is not None:
            raise broken  # before any GPU work: a declared pack that did not import
        return runner

    def _runner_config(self, comfyui_dir: Path, env_key: str, sys_path: tuple[str, ...], *,
                       declares_nodes: bool) -> RunnerConfig:
        """The child's config for an environment (a run's, or the pre-start's guess)."""
        node_dirs = (str(comfyui_dir / "custom_nodes"),
                     *(str(d) for d in self.config.extra_custom_node_dirs))
        child_root = self._run_dirs.child_root
        return RunnerConfig(
            comfyui_dir=str(comfyui_dir),
            base_dir=str(child_root / "base"),
            env_key=env_key,
            custom_node_dirs=node_dirs,
            extra_sys_path=sys_path,
            cpu=self.config.cpu,
            child_entry=self.config.child_entry,
            startup_timeout_s=self.config.startup_timeout_s,
            env_pass=self.config.child_env_pass,
            sandbox=self._sandbox_plan(child_root),
            # A child that loads a stranger's code serves one owner only (SPEC §9).
            custom_code=declares_nodes or loads_custom_nodes(node_dirs),
        )

    def _checked_ready(self, ready: Any, comfyui_dir: Path) -> Any:
        """``ready`` with the checkout's commit as the worker knows it: the pinned commit
        of an environment it checked out, else (a baked checkout, the operator's) read by
        git once per checkout.

        The child's own word is not taken: it is sent after custom nodes ran, and in the
        sandbox a pinned environment's git metadata (in the mirror) is out of its sight.
        """
        if ready is None:
            return None
        if comfyui_dir not in self._commits:
            from runflow_worker.runtime.comfy import git_commit

            self._commits[comfyui_dir] = git_commit(str(comfyui_dir))
        return replace(ready, comfyui_commit=self._commits[comfyui_dir])

    def _sandbox_plan(self, child_root: Path) -> SandboxPlan | None:
        """The child's sandbox: its own root writable (emptied at each start), the runs'
        models and resources read-only, nothing else of the cache volume (the runner adds
        the environment)."""
        if not self.config.sandbox:
            return None
        hidden = (self.config.work_dir, *self.config.sandbox_hidden)
        # The sandbox binds only what exists when the child starts, which can be before any
        # run made these (``prestart``): a links root made later would stay out of its sight.
        for root in (child_root, self._run_dirs.links_root):
            root.mkdir(parents=True, exist_ok=True)
        return SandboxPlan(
            read_only=(str(self._run_dirs.links_root),
                       *(str(p) for p in self.config.sandbox_read_only)),
            writable=(str(child_root),), hidden=tuple(str(p) for p in hidden),
            fresh=(str(child_root),), network=self.config.child_network,
            chdir=str(child_root))

    def _prepare_environment(self, message: c.RunMessage,
                             stop_reason: Callable[[], StopReason | None]) -> Any:
        """The prepared environment the workflow pins (built now if it is new)."""
        if self.environments is None:
            raise RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                             "no ComfyUI checkout (RUNFLOW_COMFYUI_DIR) and no environment "
                             "builder configured")
        from runflow_worker.cache.environments import EnvironmentSpec, NodePin
        from runflow_worker.cache.errors import BuildCanceled, CacheError, OriginRefused

        wf = message.workflow
        comfy = wf.environment.comfyui
        spec = EnvironmentSpec(
            comfyui_origin=comfy.origin or "", comfyui_commit=comfy.commit or "",
            custom_nodes=tuple(NodePin(name, pin.origin or "", pin.commit or "")
                               for name, pin in wf.custom_nodes.items()),
            install_scripts=self.config.run_install_scripts)
        self._pin_environment(spec.key)
        try:
            return self.environments.prepare(spec, cancel=lambda: stop_reason() is not None)
        except BaseException as exc:
            self._unpin_environments(keep=self._warm_env_key())
            if isinstance(exc, BuildCanceled):
                raise _interrupted(stop_reason() or StopReason.CANCELED) from exc
            if isinstance(exc, OriginRefused):
                raise RunFailure(ErrorCode.FORBIDDEN_ORIGIN,
                                 f"building environment {spec.key} failed: {exc}",
                                 details={"env_key": spec.key}) from exc
            full = disk_problem(self.config.work_dir, exc)
            if isinstance(exc, (CacheError, OSError)) and full is not None:
                raise WorkerUnfit(full) from exc
            if isinstance(exc, CacheError):
                raise RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                                 f"building environment {spec.key} failed: {exc}",
                                 details={"env_key": spec.key}) from exc
            raise

    def _pin_environment(self, key: str) -> None:
        if key in self._env_pins or self.environments is None:
            return
        stack = ExitStack()
        stack.enter_context(self.environments.pin(key))
        self._env_pins[key] = stack

    def _unpin_environments(self, keep: str | None) -> None:
        """Release the pins of every environment but ``keep``."""
        for key in [k for k in self._env_pins if k != keep]:
            self._env_pins.pop(key).close()

    def _warm_env_key(self) -> str | None:
        runner = self.supervisor.runner
        if runner is None or runner.state.value in ("new", "defunct"):
            return None
        return runner.config.env_key

    def _fetch_models(self, message: c.RunMessage, run: RunPaths, control: RunControl,
                      stop_reason: Callable[[], StopReason | None]) -> list[WantedBlob]:
        """Fetch the run's missing blobs in parallel (``run.modelfiles``); they are linked
        once the run's own child is there."""
        wanted = wanted_blobs(message.workflow, run)
        if not wanted:
            return wanted
        if self.blobs is None:
            raise RunFailure(ErrorCode.MODEL_FETCH_FAILED, "no model store configured")
        from runflow_worker.cache.errors import FetchCanceled

        fields_of: dict[str, list[str]] = {}
        for w in wanted:
            fields_of.setdefault(w.sha256, []).append(w.field)

        def progress(sha: str, done: int, total: int | None) -> None:
            control.emit("progress", {"phase": "models", "sha256": sha,
                                      "fields": fields_of[sha], "bytes": done, "total": total})

        try:
            fetch_blobs(self.blobs, wanted, message.workflow.owner,
                        max_parallel=self.config.model_fetch_parallel, progress=progress,
                        cancel=lambda: stop_reason() is not None)
        except FetchCanceled as exc:
            raise _interrupted(stop_reason() or StopReason.CANCELED) from exc
        return wanted

    def _upload(self, files: Any, run: RunPaths, run_id: str,
                stop_reason: Callable[[], StopReason | None]) -> list[c.OutputEntry]:
        """Store the outputs, stopping (between files and mid-transfer) like every phase.

        A run that does not succeed keeps no outputs: what was stored is deleted
        (best-effort, on a background thread: the terminal record does not wait for the
        storage), except on SHUTDOWN, where the run is released (its next pickup writes the
        same keys) or another worker already holds it and may be writing them.
        """
        written: list[str] = []
        try:
            return store_outputs(files, run.dir("output"), run_id, self.storage,
                                 trusted_root=run.child_root,
                                 should_stop=lambda: stop_reason() is not None,
                                 written=written,
                                 keep_if_late=lambda: stop_reason() is StopReason.SHUTDOWN)
        except BaseException as exc:
            reason = stop_reason()
            if written and reason is not StopReason.SHUTDOWN:
                discard_outputs_later(self.storage, written, run_id=run_id)
            if isinstance(exc, UploadCanceled):
                raise _interrupted(reason or StopReason.CANCELED) from exc
            raise

    def _fetch_inputs(self, defs: dict[str, c.InputDef], values: dict[str, Any],
                      input_dir: Path,
                      stop_reason: Callable[[], StopReason | None]) -> dict[str, str]:
        if self.fetch_input is None:
            if any(d.type in (c.InputType.IMAGE, c.InputType.FILE) and k in values
                   for k, d in defs.items()):
                raise RunFailure(ErrorCode.INPUT_FETCH_FAILED, "no input fetcher configured")
            return {}
        from runflow_worker.cache.errors import CacheError, FetchCanceled

        try:
            return materialise_inputs(
                defs, values, input_dir, self.fetch_input,
                max_bytes=self.config.input_max_bytes,
                max_pixels=self.config.image_max_pixels,
                cancel=lambda: stop_reason() is not None,
            )
        except FetchCanceled as exc:
            raise _interrupted(stop_reason() or StopReason.CANCELED) from exc
        except CacheError as exc:
            raise RunFailure(ErrorCode.INPUT_FETCH_FAILED, str(exc)) from exc

    def _run_graph(self, runner: Any, message: c.RunMessage, graph: dict[str, Any],
                   run: RunPaths, control: RunControl,
                   stop_reason: Callable[[], StopReason | None]) -> p.Done | p.Failed:
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

    @staticmethod
    def _failure_from(outcome: p.Failed, reason: StopReason | None) -> RunFailure:
        if outcome.kind is p.FailureKind.INTERRUPTED or (
            reason is not None and outcome.kind is p.FailureKind.CHILD_DIED
        ):
            return _interrupted(reason or StopReason.CANCELED)
        details = dict(outcome.details)
        if outcome.exception_type:
            details["exception_type"] = outcome.exception_type
        return RunFailure(_FAILURE_CODES[outcome.kind], outcome.message,
                          node_id=outcome.node_id, node_type=outcome.node_type, details=details)


def _interrupted(reason: StopReason) -> RunInterrupted:
    if reason is StopReason.TIMEOUT:
        return RunInterrupted(ErrorCode.TIMEOUT, "the run exceeded its timeout_s")
    if reason is StopReason.SHUTDOWN:
        return RunInterrupted(ErrorCode.WORKER_LOST,
                              "the worker shut down before the run finished", release=True)
    return RunInterrupted(ErrorCode.CANCELED, "the run was canceled")
