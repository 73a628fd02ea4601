"""The operator's sandbox setting (``RUNFLOW_SANDBOX``) applied: start checks and builds.

With ``bwrap`` (the default), ``serve`` and ``run`` start only where a sandbox can be
started (``probe``: one real sandbox running ``true``); otherwise they exit with code 2 and
one line saying why. With ``none``, every start, ``doctor`` and ``/readyz``'s body say the
worker is unsandboxed, and the logs carry a warning. ``docs/sandbox.md`` has the why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runflow_worker.runtime.sandbox import SandboxPlan, SandboxUnavailable, command_prefix, probe
from runflow_worker.settings import Settings

log = logging.getLogger(__name__)

UNSANDBOXED = ("RUNFLOW_SANDBOX=none: custom-node code runs unconfined, with the worker's "
               "files, processes and network within its reach (docs/sandbox.md)")
"""What the worker says wherever it reports that it runs without a sandbox."""


def check_sandbox(settings: Settings) -> str:
    """A description of the working sandbox; ``SandboxUnavailable`` when there is none.

    With ``RUNFLOW_SANDBOX=none`` nothing is started and the description says so.
    """
    if not settings.sandboxed:
        return UNSANDBOXED
    return probe()


def refuse_without_sandbox(settings: Settings, command: str) -> str | None:
    """The one line ``command`` exits with (code 2) when it must not start, else None.

    Logs the warning of an unsandboxed worker (``RUNFLOW_SANDBOX=none``).
    """
    if not settings.sandboxed:
        log.warning(UNSANDBOXED, extra={"event": "unsandboxed"})
        return None
    try:
        probe()
    except SandboxUnavailable as exc:
        return (f"runflow-worker {command}: no working sandbox ({exc}); set "
                "RUNFLOW_SANDBOX=none to run custom nodes unconfined")
    return None


def build_sandbox(settings: Settings) -> Callable[[Path, Mapping[str, str], Path],
                                                  Sequence[str]] | None:
    """The environment builds' sandbox (``cache.environments.BuildSandbox``), or None when
    the operator turned sandboxing off: the package index reachable, writable only the
    environment being built, the cache volume hidden, local ``--find-links`` readable."""
    if not settings.sandboxed:
        return None
    read_only = tuple(os.path.abspath(p) for p in settings.pip_find_links
                      if "://" not in p and os.path.isdir(p))

    def prefix(writable: Path, env: Mapping[str, str], cwd: Path) -> Sequence[str]:
        plan = SandboxPlan(read_only=read_only, writable=(str(writable),),
                           hidden=(str(settings.cache_dir),), network=True, chdir=str(cwd))
        return command_prefix(plan, env)

    return prefix
