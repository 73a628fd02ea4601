"""Fixtures for tests that run real ComfyUI (``RUNFLOW_TEST_COMFYUI`` = a checkout); the
helpers the tests call are in ``tests.comfyui.scenario``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.comfyui.scenario import COMFY, HERE, SANDBOX_READ_ONLY


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Settings-level paths shared by the real-ComfyUI tests."""
    root = tmp_path_factory.mktemp("comfy")
    return {"root": root, "cache": root / "cache", "store": root / "store"}


@pytest.fixture(scope="session")
def pipeline(comfy_env: dict[str, Any]):
    """One warm ComfyUI child for the whole session (as a worker keeps it)."""
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    settings = Settings(cache_dir=comfy_env["cache"], comfyui_dir=Path(COMFY),
                        gpu_class="cpu", url_allow=("127.0.0.1/32",),
                        extra_custom_nodes=(str(HERE / "custom_nodes"),))
    pl = build_pipeline(settings, storage=LocalStorage(comfy_env["store"]),
                        allow_local_files=True, cpu=True, sandbox_read_only=SANDBOX_READ_ONLY)
    yield pl
    pl.close()


@pytest.fixture(scope="session")
def sd15_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random SD1.5 UNet, CLIP-L and TAESD, generated once per session."""
    out = tmp_path_factory.mktemp("sd15")
    subprocess.run([sys.executable, str(HERE / "gen_sd15_tiny.py"), COMFY, str(out)],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    return out
