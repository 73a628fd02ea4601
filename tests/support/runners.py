"""Runners for tests: the config of a fake ComfyUI child, a job for it, whether it is gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.runner import RunnerConfig
from tests.fakes import FAKE_CHILD


def runner_config(root: Path, *, entry: str = FAKE_CHILD, **fields: Any) -> RunnerConfig:
    """The config of a child ``entry`` (the fake child unless told) with the checkout
    ``root``, its base directory in ``root/base``, a minute to start; ``fields`` are other
    ``RunnerConfig`` fields (``env``, ``custom_code``...)."""
    return RunnerConfig(comfyui_dir=str(root), base_dir=str(root / "base"), child_entry=entry,
                        startup_timeout_s=60, **fields)


def job(root: Path, graph: dict[str, Any], job_id: str = "j1") -> p.Execute:
    """A job running ``graph`` with its input, output and temp directories under ``root``."""
    for d in ("in", "out", "tmp"):
        (root / d).mkdir(exist_ok=True)
    return p.Execute(job_id=job_id, graph=graph, input_dir=str(root / "in"),
                     output_dir=str(root / "out"), temp_dir=str(root / "tmp"))


def gone(pid: int) -> bool:
    """True when no process has ``pid`` any more (the stopped child was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
