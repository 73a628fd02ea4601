"""The ``runflow-worker`` command for tests: in this process, or as a user runs it (a
subprocess with a fake ComfyUI child)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import FAKE_CHILD
from tests.support.paths import REPO


def run_cli(argv: list[str], redis_url: str, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``runflow-worker ARGV`` in this process against ``redis_url``: (code, out, err)."""
    from runflow_worker.cli.main import main

    monkeypatch.setenv("RUNFLOW_REDIS_URL", redis_url)
    monkeypatch.setenv("RUNFLOW_GPU_CLASS", "cpu")
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def cli(cwd: Path, *args: str, env: dict[str, str | None] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``python -m runflow_worker.cli.main ARGS`` in ``cwd``, with none of this machine's
    ``RUNFLOW_*`` variables: the cache in ``cwd/cache``, ComfyUI at ``cwd`` run by the fake
    child, class ``cpu``; ``env`` overrides (None removes a variable)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    full.update({"RUNFLOW_CACHE_DIR": str(cwd / "cache"),
                 "RUNFLOW_COMFYUI_DIR": str(cwd), "RUNFLOW_GPU_CLASS": "cpu",
                 "RUNFLOW_RUNNER_ENTRY": FAKE_CHILD,
                 "PYTHONPATH": str(REPO)})
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run([sys.executable, "-m", "runflow_worker.cli.main", *args],
                          capture_output=True, text=True, env=full, timeout=120, cwd=cwd,
                          check=False)
