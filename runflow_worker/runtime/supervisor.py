"""The supervisor: one warm ComfyUI runner, for one tenant at a time (SPEC section 9).

A child that has loaded custom nodes (code of a stranger) serves only runs of one owner and
one environment; anything else stops it and starts another. ``serve`` may start a child
before any run arrives (``prestart``); it belongs to the first run that takes it. The
runner itself (the child's lifecycle, the channel) is ``runtime.runner``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from runflow_worker.runtime.errors import RunnerStartCanceled, RunnerStartFailed
from runflow_worker.runtime.runner import Runner, RunnerConfig, RunnerState

log = logging.getLogger(__name__)

_SHARED: tuple[str | None, ...] = ("shared",)
"""The tenant of a child without custom nodes: every owner's runs may use it."""

_UNBOUND: tuple[str | None, ...] = ("unbound",)
"""The tenant of a pre-started child (``RunnerSupervisor.prestart``) before its first run:
it has served no one, so the first run of any owner may take it, which binds it."""


@dataclass(frozen=True)
class RunnerLease:
    """What ``RunnerSupervisor.acquire`` hands out: a READY runner, and whether a child was
    started for this call (the first start, an owner or environment switch, a restart after
    a death: the run's cold start)."""

    runner: Runner
    started: bool
    """Also True when the call waited for a pre-started child to finish its start."""


class RunnerSupervisor:
    """Keeps one warm runner for one tenant; anything else stops it and starts another.

    The tenant of a child that loads custom nodes (``RunnerConfig.custom_code``) is the
    owner of the run it was started for (``workflow.owner``; None, no owner, is an owner of
    its own and never equal to a named one): hostile code may keep what one owner's run
    gave it (inputs, outputs, models) in the process and hand it to the next run, so only
    that owner's runs reuse it. A child without custom nodes runs trusted code only and is
    shared by every owner. One child at a time (GPU memory): the old one is stopped before
    the new one starts.
    """

    poll_s = 0.05
    """How often a call waiting for a pre-start checks its ``should_stop``."""

    def __init__(self) -> None:
        self.runner: Runner | None = None
        self.restarts = 0
        self.tenant: tuple[str | None, ...] | None = None
        """Whose runs the warm child serves (see ``tenant_of``); None without a child."""
        # Held by whoever starts or stops a child: a pre-start on its own thread, a run's
        # acquire, close. A run that finds it held waits for the pre-start (its cold start).
        self._lock = threading.Lock()
        self._prestarting: RunnerConfig | None = None
        self._prestart_cancel = threading.Event()
        self._closed = False
        self.prestart_began = threading.Event()
        """Set once ``prestart`` has made its runner (or decided to make none)."""
        self.prestart_awaited = threading.Event()
        """Set once a call of ``acquire`` has waited for a start in progress."""

    def prestart(self, config: RunnerConfig) -> bool:
        """Start a child for ``config`` before any run asks for one (``serve`` at boot);
        True when it is READY. Blocking: call it on a thread of its own.

        The child is bound to no owner yet: the first run of any owner that acquires the same
        config takes it, and it is then that owner's (or shared, without custom code) like a
        child started for that run. A failed or canceled pre-start only logs: the runner is
        dropped, counts as no restart, and the next run starts its own child as if there had
        been none. A run for another config, or ``close``, cancels it.
        """
        with self._lock:
            if self._closed or self.runner is not None:
                self.prestart_began.set()
                return False
            runner = self.runner = Runner(config)
            self.tenant = _UNBOUND
            self.prestart_began.set()
            self._prestarting = config
            self._prestart_cancel.clear()
            try:
                runner.start(self._prestart_cancel.is_set)
            except RunnerStartCanceled:
                log.info("pre-start of ComfyUI canceled (a run for another environment, or "
                         "the worker stops)", extra={"event": "prestart_canceled"})
                self.runner, self.tenant = None, None
                return False
            except RunnerStartFailed as exc:
                log.warning("pre-starting ComfyUI failed (the next run starts its own): %s",
                            exc, extra={"event": "prestart_failed"})
                self.runner, self.tenant = None, None
                return False
            finally:
                self._prestarting = None
            log.info("pre-started ComfyUI for environment %s", config.env_key,
                     extra={"event": "child_prestarted", "env_key": config.env_key,
                            "pid": runner.pid})
            return True

    @staticmethod
    def tenant_of(config: RunnerConfig, owner: str | None) -> tuple[str | None, ...]:
        """Who may share a child of ``config`` with a run of ``owner``."""
        return ("owner", owner) if config.custom_code else _SHARED

    def acquire(self, config: RunnerConfig, *, owner: str | None = None,
                should_stop: Callable[[], bool] | None = None) -> RunnerLease:
        """A READY runner for ``config`` and a run of ``owner``, starting or restarting the
        child as needed; ``started`` says whether a child was started for this call.

        Raises ``RunnerStartFailed`` / ``RunnerStartCanceled`` like ``Runner.start``.
        """
        prestarting = self._prestarting
        if prestarting is not None and prestarting != config:
            self._prestart_cancel.set()  # the wrong environment: do not wait for it
        waited = False
        while not self._lock.acquire(timeout=self.poll_s):
            waited = True  # a pre-start holds it: its remaining start is this run's wait
            self.prestart_awaited.set()
            if should_stop is not None and should_stop():
                raise RunnerStartCanceled("ComfyUI start was interrupted")
        try:
            lease = self._acquire(config, owner, should_stop)
        finally:
            self._lock.release()
        return replace(lease, started=lease.started or waited) if waited else lease

    def _acquire(self, config: RunnerConfig, owner: str | None,
                 should_stop: Callable[[], bool] | None) -> RunnerLease:
        tenant = self.tenant_of(config, owner)
        runner = self.runner
        if runner is not None and self.tenant == _UNBOUND and runner.config == config:
            # A pre-started child has served no one: this run's owner takes and binds it.
            self.tenant = tenant
        if runner is not None and (runner.config != config or self.tenant != tenant):
            runner.stop()  # before the next one starts: one child's GPU memory at a time
            runner = self.runner = None
            self.tenant = None
        if runner is None:
            runner = self.runner = Runner(config)
            self.tenant = tenant
        runner.notice_death()  # a child that died while idle: DEFUNCT, restarted below
        if runner.state is RunnerState.DEFUNCT:
            self.restarts += 1
        started = runner.state in (RunnerState.NEW, RunnerState.DEFUNCT)
        if started:
            runner.start(should_stop)
        return RunnerLease(runner, started)

    def reacquire(self, runner: Runner, *, owner: str | None = None,
                  should_stop: Callable[[], bool] | None = None) -> RunnerLease:
        """``runner`` (acquired earlier for a run of ``owner``) again, just before its job:
        itself while its child lives (``started`` False), else ``acquire`` for its config (the
        child died while idle, e.g. the OOM killer: a restart, ``started`` True).

        Raises like ``acquire``.
        """
        if not runner.notice_death():
            return RunnerLease(runner, started=False)
        return self.acquire(runner.config, owner=owner, should_stop=should_stop)

    def ready_for(self, env_key: str, owner: str | None, *, custom_code: bool = False) -> bool:
        """Whether ``acquire`` for a config of ``env_key`` and a run of ``owner`` would find
        the child READY as it is: a guess for the caller's planning, nothing is held (a
        wrong guess only changes where the caller's ``acquire`` waits). ``custom_code``: the
        run loads custom code of its own (a child that does serves one owner)."""
        runner = self.runner
        if (runner is None or runner.state is not RunnerState.READY
                or self._prestarting is not None):
            return False
        config = runner.config
        if config.env_key != env_key or (custom_code and not config.custom_code):
            return False
        return self.tenant in (_UNBOUND, self.tenant_of(config, owner))

    def warm_config(self, env_key: str, owner: str | None, *,
                    custom_code: bool = False) -> RunnerConfig | None:
        """The READY child's config when ``ready_for`` says it serves such a run as it is
        (the config to ``acquire`` it with), else None."""
        runner = self.runner
        if runner is None or not self.ready_for(env_key, owner, custom_code=custom_code):
            return None
        return runner.config

    @property
    def warm_env_key(self) -> str | None:
        """The environment key of the child that is started or starting (the one whose files
        must stay), or None without one (no runner, or one never started or dead)."""
        runner = self.runner
        if runner is None or runner.state in (RunnerState.NEW, RunnerState.DEFUNCT):
            return None
        return runner.config.env_key

    def runner_for(self, config: RunnerConfig,
                   should_stop: Callable[[], bool] | None = None, *,
                   owner: str | None = None) -> Runner:
        """``acquire(...).runner``: a READY runner for ``config`` and a run of ``owner``."""
        return self.acquire(config, owner=owner, should_stop=should_stop).runner

    def close(self) -> None:
        """Stop the child, if any (a pre-start in progress is canceled)."""
        self._closed = True
        self._prestart_cancel.set()
        with self._lock:
            if self.runner is not None:
                self.runner.stop()
                self.runner = None
                self.tenant = None
