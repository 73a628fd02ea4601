"""The ComfyUI child's config (``RunnerConfig``) for an environment, and ``serve``'s early
pre-start of the baked checkout's child.

Light to import (the runtime's runner and sandbox, the run directories; not the pipeline,
the contract's models, the daemon or Redis): ``serve`` spawns the baked checkout's child
from here before it imports those, and ComfyUI's import (seconds) overlaps them. What is
left before the spawn is the interpreter's start and the settings' import (pydantic):
~0.26 s after launch on the 2-core machine (``docs/serve.md``, "Cold start").
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

from runflow_worker.run.fitness import checkout_problem
from runflow_worker.run.rundirs import RunDirs
from runflow_worker.runtime.customnodes import loads_custom_nodes
from runflow_worker.runtime.runner import RunnerConfig
from runflow_worker.runtime.sandbox import SandboxPlan
from runflow_worker.runtime.supervisor import RunnerSupervisor

if TYPE_CHECKING:
    from runflow_worker.run.config import PipelineConfig

log = logging.getLogger(__name__)

BAKED = "baked"
"""The environment key of the baked checkout (``RUNFLOW_COMFYUI_DIR``)."""


def child_config(config: PipelineConfig, run_dirs: RunDirs, comfyui_dir: Path, env_key: str,
                 sys_path: tuple[str, ...], *, declares_nodes: bool) -> RunnerConfig:
    """The child's config for an environment (a run's, or the pre-start's guess)."""
    node_dirs = (str(comfyui_dir / "custom_nodes"),
                 *(str(d) for d in config.extra_custom_node_dirs))
    child_root = run_dirs.child_root
    return RunnerConfig(
        comfyui_dir=str(comfyui_dir),
        base_dir=str(child_root / "base"),
        env_key=env_key,
        custom_node_dirs=node_dirs,
        extra_sys_path=sys_path,
        cpu=config.cpu,
        child_entry=config.child_entry,
        startup_timeout_s=config.startup_timeout_s,
        env_pass=config.child_env_pass,
        sandbox=_sandbox_plan(config, run_dirs, child_root),
        # A child that loads a stranger's code serves one owner only (SPEC §9).
        custom_code=declares_nodes or loads_custom_nodes(node_dirs),
    )


def baked_child_config(config: PipelineConfig, run_dirs: RunDirs) -> RunnerConfig | None:
    """The child of the baked checkout (``RUNFLOW_COMFYUI_DIR``), which every run uses;
    None without one, or when it is broken (the first run reports that: the worker is
    unfit)."""
    if config.comfyui_dir is None or checkout_problem(config.comfyui_dir) is not None:
        return None
    return child_config(config, run_dirs, config.comfyui_dir, BAKED, (), declares_nodes=False)


def start_prestart(supervisor: RunnerSupervisor, config: RunnerConfig
                   ) -> tuple[futures.ThreadPoolExecutor, futures.Future[bool]]:
    """Start ``supervisor.prestart(config)`` on a thread of its own: that thread's executor
    (its owner shuts it down, ``wait=True``, after closing the supervisor) and the future of
    whether the child is READY."""
    prestarter = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prestart")
    return prestarter, prestarter.submit(supervisor.prestart, config)


def prestart_baked(supervisor: RunnerSupervisor, config: PipelineConfig, run_dirs: RunDirs
                   ) -> tuple[futures.ThreadPoolExecutor, futures.Future[bool]] | None:
    """``start_prestart`` of the baked checkout's child, before the pipeline exists; None
    without a baked checkout or when its config cannot be made (logged: a guess never stops
    the worker)."""
    try:
        child = baked_child_config(config, run_dirs)
    except Exception as exc:  # noqa: BLE001 - a guess must never stop the worker
        log.warning("no ComfyUI pre-start: %s", exc, extra={"event": "prestart_failed"})
        return None
    return start_prestart(supervisor, child) if child is not None else None


def _sandbox_plan(config: PipelineConfig, run_dirs: RunDirs,
                  child_root: Path) -> SandboxPlan | None:
    """The child's sandbox: its own root writable (emptied at each start), the runs' models
    and resources read-only, nothing else of the cache volume (the runner adds the
    environment)."""
    if not config.sandbox:
        return None
    hidden = (config.work_dir, *config.sandbox_hidden)
    # The sandbox binds only what exists when the child starts, which can be before any run
    # made these (``prestart``): a links root made later would stay out of its sight.
    run_dirs.make_roots()
    return SandboxPlan(
        read_only=(str(run_dirs.links_root), *(str(p) for p in config.sandbox_read_only)),
        writable=(str(child_root),), hidden=tuple(str(p) for p in hidden),
        fresh=(str(child_root),), network=config.child_network, chdir=str(child_root))
