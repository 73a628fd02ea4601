"""A run's environment phase: the environment its workflow pins (built once per key), and a
READY ComfyUI child in it; also the pre-start's guess of the next run's child.

The phase runs on its own thread while the run's models and inputs download
(``run.pipeline``), unless the warm child already is the run's (``is_warm``): then there is
nothing to overlap, and the run's own thread does it when it needs the child. It shares
nothing with the run it works for: ``run`` returns what it produced (``EnvironmentOutcome``,
a frozen value: the child, its cold start, what the record says of the environment, or the
exception that ended it), and the run's own thread records it. The supervisor decides about
children (``RunnerSupervisor.acquire``: a start, a switch, a restart; ``reacquire`` just
before the job); the phase asks and reports what it was told.

What the phase keeps between runs: the pins of the environments in use (the warm child's,
the one being prepared: no gc on the volume removes them meanwhile), the commits of the
checkouts, what the environment report read of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runflow_worker.errors import ErrorCode, RunFailure, RunInterrupted, WorkerUnfit
from runflow_worker.run import contract as c
from runflow_worker.run.childconfig import BAKED, baked_child_config, child_config
from runflow_worker.run.envreport import EnvironmentReport
from runflow_worker.run.failures import StopCheck, run_failures
from runflow_worker.run.fitness import checkout_problem, start_failure_cause
from runflow_worker.run.rundirs import RunDirs
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import RunnerStartFailed
from runflow_worker.runtime.runner import Runner, RunnerConfig
from runflow_worker.runtime.supervisor import RunnerSupervisor

if TYPE_CHECKING:
    from runflow_worker.run.pipeline import PipelineConfig


class EnvironmentBuilder(Protocol):
    """What the environment phase needs of ``cache.environments.Environments``."""

    def prepare(self, spec: Any, *, cancel: Callable[[], bool] | None = None) -> Any: ...

    def pin(self, key: str) -> Any: ...


@dataclass(frozen=True)
class PreparedChild:
    """What the environment phase produced for a run: its READY child, and what the run's
    record says of it."""

    runner: Runner
    cold_start_s: float
    """The starts this run waited for (0 when the warm child served it as it was)."""
    gpu_model: str | None
    environment: dict[str, Any]
    """The record's ``environment`` (``run.envreport``); read it, never change it."""
    warnings: tuple[str, ...]
    pack_failure: RunFailure | None
    """``ENVIRONMENT_FAILED`` for a pack the workflow declares that did not import: the run
    fails before any GPU work, and its record still says what the environment was."""


@dataclass(frozen=True)
class EnvironmentOutcome:
    """What the environment thread hands back: its product, or the exception that ended it
    (raised on the run's own thread), and how long the phase took."""

    elapsed_ms: int
    child: PreparedChild | None = None
    error: BaseException | None = None

    def prepared(self) -> PreparedChild:
        """The child; the phase's exception when it ended in one."""
        if self.error is not None:
            raise self.error
        assert self.child is not None
        return self.child


class EnvironmentPhase:
    """Prepares runs' environments and acquires their children from ``supervisor``."""

    def __init__(self, config: PipelineConfig, supervisor: RunnerSupervisor,
                 run_dirs: RunDirs, environments: EnvironmentBuilder | None = None) -> None:
        self.config = config
        self.supervisor = supervisor
        self.environments = environments
        self._run_dirs = run_dirs
        self._report = EnvironmentReport()
        self._commits: dict[Path, str | None] = {}
        # Pins of the environments this worker uses (by key): the warm child's, and the
        # one being prepared, so no gc on the volume removes them meanwhile.
        self._env_pins: dict[str, ExitStack] = {}
        self._last_checked: tuple[p.Ready, str | None, p.Ready] | None = None
        """The last Ready checked (``_checked_ready``): as the child sent it, the commit
        put in, the copy."""

    def run(self, message: c.RunMessage, stop_reason: StopCheck) -> EnvironmentOutcome:
        """``prepare`` timed, its exception returned, not raised: the environment thread's
        work (never raises)."""
        start = time.perf_counter()
        try:
            child = self.prepare(message, stop_reason)
        except BaseException as exc:  # noqa: BLE001 - handed to the run's thread, raised there
            return EnvironmentOutcome(_ms_since(start), error=exc)
        return EnvironmentOutcome(_ms_since(start), child=child)

    def prepare(self, message: c.RunMessage, stop_reason: StopCheck) -> PreparedChild:
        """The run's environment prepared and a READY child in it, for ``message``'s owner.

        ``RUNFLOW_COMFYUI_DIR`` overrides: every run uses that checkout. Without it, each run
        gets the environment its workflow pins, built once per environment key. Raises the
        run's failure (``run.failures``; ``WorkerUnfit`` when the worker is at fault).
        """
        if self.config.comfyui_dir is not None:
            comfyui_dir, env_key, sys_path = self.config.comfyui_dir, BAKED, ()
        else:
            env = self._prepare_environment(message, stop_reason)
            comfyui_dir, env_key = env.comfyui_dir, env.key
            sys_path = tuple(str(p) for p in env.sys_path)
            # Checked out at the pinned commit by the worker itself; its .git is what the
            # build's code left, so no git of the worker's ever reads it (a ref linked to a
            # worker's file would put that file into the record).
            self._commits[comfyui_dir] = (message.workflow.environment.comfyui.commit
                                          or "").lower() or None
        declares_nodes = bool(message.workflow.custom_nodes)
        # A warm child that already serves this environment and owner is taken as it is:
        # its config is not made again (that lists the checkout's custom nodes at every run).
        config = self.supervisor.warm_config(env_key, message.workflow.owner,
                                             custom_code=declares_nodes)
        if config is None:
            # A child to start: the baked checkout must be there (a warm child runs in it
            # already, and is not asked again at every run).
            missing = checkout_problem(self.config.comfyui_dir)
            if missing is not None:  # no start to try: every run would fail the same way
                raise WorkerUnfit(missing)
            config = self.runner_config(comfyui_dir, env_key, sys_path,
                                        declares_nodes=declares_nodes)
        start = time.monotonic()
        with self._start_failures(config, stop_reason):
            lease = self.supervisor.acquire(config, owner=message.workflow.owner,
                                            should_stop=lambda: stop_reason() is not None)
        # The previous environment's child is gone now: its pin can go too.
        self._unpin_environments(keep=env_key)
        # A first start, an owner or environment switch, a restart: the run's cold start.
        cold_start_s = time.monotonic() - start if lease.started else 0.0
        ready = lease.runner.ready
        environment, warnings = self._report.describe(
            message, config, self._checked_ready(ready, comfyui_dir), comfyui_dir)
        return PreparedChild(runner=lease.runner, cold_start_s=cold_start_s,
                             gpu_model=ready.gpu_model if ready is not None else None,
                             environment=environment, warnings=tuple(warnings),
                             pack_failure=self._report.pack_failure(message, ready))

    def is_warm(self, message: c.RunMessage) -> bool:
        """Whether the warm child already is the run's: its environment (built), READY, free
        to serve the run's owner, so that ``prepare`` has nothing to build or start."""
        if self.config.comfyui_dir is not None:
            key = BAKED
        elif self.environments is not None:
            key = _spec(message, self.config.run_install_scripts).key
        else:
            return False
        wf = message.workflow
        return self.supervisor.ready_for(key, wf.owner, custom_code=bool(wf.custom_nodes))

    def reacquire(self, child: PreparedChild, owner: str | None,
                  stop_reason: StopCheck) -> PreparedChild:
        """``child`` just before its job: the same, or, when its child died while the run's
        models and inputs downloaded (the OOM killer), a fresh one, whose start is a cold
        start of this run, not its failure (``RunnerSupervisor.reacquire``)."""
        start = time.monotonic()
        with self._start_failures(child.runner.config, stop_reason):
            lease = self.supervisor.reacquire(child.runner, owner=owner,
                                              should_stop=lambda: stop_reason() is not None)
        if not lease.started:
            return child
        return replace(child, runner=lease.runner,
                       cold_start_s=child.cold_start_s + time.monotonic() - start)

    def prestart_config(self) -> RunnerConfig | None:
        """The child the next run most likely needs, or None without a guess:
        ``RUNFLOW_COMFYUI_DIR`` (every run uses it), else the most recently used prepared
        environment on the volume (pinned until a run switches away from it)."""
        if self.config.comfyui_dir is not None:
            return baked_child_config(self.config, self._run_dirs)
        most_recent = getattr(self.environments, "most_recent", None)
        env = most_recent() if most_recent is not None else None
        if env is None:
            return None
        self._pin_environment(env.key)  # until a run switches away from it
        return self.runner_config(env.comfyui_dir, env.key,
                                  tuple(str(p) for p in env.sys_path), declares_nodes=False)

    def close(self) -> None:
        """Let every environment go (their pins)."""
        self._unpin_environments(keep=None)

    def runner_config(self, comfyui_dir: Path, env_key: str, sys_path: tuple[str, ...], *,
                      declares_nodes: bool) -> RunnerConfig:
        """The child's config for an environment (a run's, or the pre-start's guess)."""
        return child_config(self.config, self._run_dirs, comfyui_dir, env_key, sys_path,
                            declares_nodes=declares_nodes)

    # ------------------------------------------------------------------ children

    @contextmanager
    def _start_failures(self, config: RunnerConfig, stop_reason: StopCheck) -> Iterator[None]:
        """Around a call that may start a child for ``config``: a canceled or failed start
        lets the pins go (its child is gone) and becomes the run's outcome: the stop's,
        ``WorkerUnfit`` when the worker is at fault (``run.fitness``), else
        ``ENVIRONMENT_FAILED``."""
        try:
            with run_failures(stop_reason):
                yield
        except RunInterrupted:  # the start was canceled
            self._unpin_environments(keep=None)
            raise
        except RunnerStartFailed as exc:
            self._unpin_environments(keep=None)
            cause = start_failure_cause(config, self.config.work_dir,
                                        self.config.comfyui_dir, exc)
            if cause is not None:
                raise WorkerUnfit(cause) from exc
            raise RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                             f"ComfyUI failed to start: {exc}",
                             details={"traceback": exc.traceback[-4000:]}) from exc

    def _checked_ready(self, ready: p.Ready | None, comfyui_dir: Path) -> p.Ready | None:
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
        commit = self._commits[comfyui_dir]
        last = self._last_checked
        # The warm child's Ready, checked for its last run, again: no new copy every run.
        if last is not None and last[0] is ready and last[1] == commit:
            return last[2]
        checked = replace(ready, comfyui_commit=commit)
        self._last_checked = (ready, commit, checked)
        return checked

    # ------------------------------------------------------------------ environments

    def _prepare_environment(self, message: c.RunMessage, stop_reason: StopCheck) -> Any:
        """The prepared environment the workflow pins (built now if it is new)."""
        if self.environments is None:
            raise RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                             "no ComfyUI checkout (RUNFLOW_COMFYUI_DIR) and no environment "
                             "builder configured")
        spec = _spec(message, self.config.run_install_scripts)
        self._pin_environment(spec.key)
        try:
            with run_failures(stop_reason, ErrorCode.ENVIRONMENT_FAILED,
                              blame=lambda: (f"building environment {spec.key} failed: ",
                                             {"env_key": spec.key}),
                              full_volume=self.config.work_dir):
                return self.environments.prepare(spec, cancel=lambda: stop_reason() is not None)
        except BaseException:
            self._unpin_environments(keep=self.supervisor.warm_env_key)
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


def _spec(message: c.RunMessage, install_scripts: bool) -> Any:
    """The environment the run's workflow pins (``cache.environments.EnvironmentSpec``)."""
    from runflow_worker.cache.environments import EnvironmentSpec, NodePin

    wf = message.workflow
    comfy = wf.environment.comfyui
    return EnvironmentSpec(
        comfyui_origin=comfy.origin or "", comfyui_commit=comfy.commit or "",
        custom_nodes=tuple(NodePin(name, pin.origin or "", pin.commit or "")
                           for name, pin in wf.custom_nodes.items()),
        install_scripts=install_scripts)


def _ms_since(start: float) -> int:
    """Milliseconds since ``start`` (``time.perf_counter``), rounded as the run's phases are."""
    return round((time.perf_counter() - start) * 1000)
