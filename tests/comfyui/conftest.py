"""Fixtures for tests that run real ComfyUI (``RUNFLOW_TEST_COMFYUI`` = a checkout)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from runflow_worker.cache.access import AccessRecords

COMFY = os.environ.get("RUNFLOW_TEST_COMFYUI")
SANDBOX_READ_ONLY = tuple(Path(p) for p in
                          os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY", "").split(",") if p)
"""Extra paths the sandboxed child may read (a machine's own shim libraries, say)."""
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def seed_blob(blobs_root: Path, path: Path) -> str:
    """Put ``path`` into the content-addressed store as a local operator would; return sha."""
    digest = sha256_file(path)
    dest = blobs_root / "sha256" / digest[:2] / digest
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        dest.chmod(0o444)
    # As a public source leaves it: a blob without an access record is served to nobody.
    AccessRecords(blobs_root / "access").record(digest, None, private=False)
    return digest


def url_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


class Control:
    """A RunControl that records events and can cancel on a predicate over events."""

    def __init__(self, cancel_when: Any = None) -> None:
        import threading

        self.events: list[tuple[str, dict[str, Any]]] = []
        self.canceled = threading.Event()
        self.cancel_when = cancel_when
        self.canceled_at: float | None = None

    def stop_reason(self):
        from runflow_worker.run.pipeline import StopReason

        return StopReason.CANCELED if self.canceled.is_set() else None

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        import time

        self.events.append((kind, data))
        if self.cancel_when is not None and not self.canceled.is_set() and self.cancel_when(data):
            self.canceled_at = time.monotonic()
            self.canceled.set()


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
