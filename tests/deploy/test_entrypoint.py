"""The container's entry point: PID 1 stays root, the worker runs as the image's user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ENTRYPOINT = Path(__file__).resolve().parents[2] / "entrypoint.sh"
STUB = """#!/bin/sh
echo "uid=$(id -u) args=$* cache=$([ -d "$RUNFLOW_CACHE_DIR" ] && echo made)"
"""


@pytest.fixture
def stub_dir() -> Iterator[Path]:
    """A directory any user can read, holding a stand-in ``runflow-worker``."""
    root = Path(tempfile.mkdtemp(prefix="entrypoint-"))
    root.chmod(0o777)  # the unprivileged user makes the cache directory in it
    (root / "bin").mkdir(mode=0o755)
    stub = root / "bin" / "runflow-worker"
    stub.write_text(STUB)
    stub.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run(stub_dir: Path, user: str) -> str:
    env = {"PATH": f"{stub_dir / 'bin'}:/usr/bin:/bin", "RUNFLOW_USER": user,
           "RUNFLOW_CACHE_DIR": str(stub_dir / "cache")}
    out = subprocess.run([str(ENTRYPOINT), "serve", "--burst"], env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="dropping to another user needs root and setpriv (util-linux)")
def test_root_drops_to_the_workers_user(stub_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    assert _run(stub_dir, "nobody") == f"uid={nobody} args=serve --burst cache=made"


def test_without_that_user_the_worker_runs_as_started(stub_dir: Path) -> None:
    assert _run(stub_dir, "no-such-user-here") == (
        f"uid={os.geteuid()} args=serve --burst cache=made")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="dropping to another user needs root and setpriv (util-linux)")
def test_a_root_owned_cache_directory_is_handed_to_the_worker(stub_dir: Path) -> None:
    """A host directory mounted as the cache arrives owned by root: the worker gets it (the
    directory itself, not what is already in it)."""
    cache = stub_dir / "cache"
    cache.mkdir()
    os.chown(cache, 0, 0)
    (cache / "kept").touch()
    nobody = pwd.getpwnam("nobody")
    _run(stub_dir, "nobody")
    assert (cache.stat().st_uid, cache.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert (cache / "kept").stat().st_uid == 0
