"""Whose fault is a failed ComfyUI start: the worker's (release the run) or the run's (fail it).

A worker whose GPU or disk is broken would otherwise fail every run it takes: a black hole
that empties the queue into failed records while healthy workers idle. So when a start
fails, the worker looks for a cause of its own, from facts it checks itself (nothing the
child says is trusted: custom-node code ran in it):

- the baked checkout (``RUNFLOW_COMFYUI_DIR``) is missing;
- the cache volume is full (``ENOSPC`` behind the error, or less than ``MIN_FREE_BYTES``
  left);
- the device is unusable: a fresh trusted child (``runtime.devicecheck``, started like the
  ComfyUI child but with nothing untrusted on its path) cannot import torch or, for CUDA,
  initialise it and run one kernel (no device, a driver too old for the image's CUDA, a
  GPU fallen off the bus).

Any of these makes the start the worker's fault: the pipeline raises ``WorkerUnfit`` and
the daemon releases the run (``Worker.release_run``) and counts the start. Otherwise the
start failed because of what the run brought (a custom node that fails to import, a bad
environment build): ``ENVIRONMENT_FAILED``, as before.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import replace
from pathlib import Path

from runflow_worker.cache.errors import InsufficientDisk
from runflow_worker.runtime.errors import RunnerStartFailed
from runflow_worker.runtime.runner import Runner, RunnerConfig

MIN_FREE_BYTES = 64 * 2**20
"""Below this much free space on the cache volume a failed start or build counts as a full
disk (pip and ComfyUI report ENOSPC in their own words, not as an exception we can see)."""
DEVICE_CHECK_ENTRY = "runflow_worker.runtime.devicecheck:main"
DEVICE_CHECK_TIMEOUT_S = 120.0
"""Longest a device check may take (importing torch and initialising CUDA: seconds)."""
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_error(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception behind it is ENOSPC (or EDQUOT), or the cache's
    ``InsufficientDisk``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InsufficientDisk) or (
                isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_problem(path: Path, exc: BaseException | None = None) -> str | None:
    """Why the volume holding ``path`` cannot take more writes, or None."""
    if disk_full_error(exc):
        return f"the cache volume is full (no space left on the device of {path})"
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    if free < MIN_FREE_BYTES:
        return f"the cache volume is full ({free} bytes free on the device of {path})"
    return None


def checkout_problem(comfyui_dir: Path | None) -> str | None:
    """Why the baked ComfyUI checkout cannot be used, or None (None too without one)."""
    if comfyui_dir is not None and not comfyui_dir.is_dir():
        return f"the ComfyUI checkout {comfyui_dir} (RUNFLOW_COMFYUI_DIR) is missing"
    return None


def device_problem(config: RunnerConfig) -> str | None:
    """Why the device ``config`` asks for is unusable, found by a trusted child, or None."""
    check = Runner(replace(
        config, child_entry=DEVICE_CHECK_ENTRY, custom_node_dirs=(), extra_sys_path=(),
        env={}, startup_timeout_s=min(config.startup_timeout_s, DEVICE_CHECK_TIMEOUT_S)))
    try:
        check.start()
    except RunnerStartFailed as exc:
        device = "the CPU" if config.cpu else "the GPU (CUDA)"
        return f"{device} is unusable: {exc}"
    finally:
        check.stop()
    return None


def start_failure_cause(config: RunnerConfig, work_dir: Path, comfyui_dir: Path | None,
                        exc: BaseException) -> str | None:
    """The worker's own reason for the failed start ``exc``, or None (the run's fault).

    Cheapest checks first; the device check starts a process (seconds), and only runs when
    the others found nothing.
    """
    return (checkout_problem(comfyui_dir) or disk_problem(work_dir, exc)
            or device_problem(config))
