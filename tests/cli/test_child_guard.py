"""The worker is non-dumpable from the start of every CLI command (and before it starts a
child): a process of its user (a ComfyUI child, pip's build code, an install.py) cannot read
its environment (where the credentials kept from them are)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
# Runs as an unprivileged user (root can read any process: the check would prove nothing),
# starts dumpable like any process, optionally guards itself, then lets a child of the same
# user read its /proc/<pid>/environ.
SCRIPT = """
import ctypes, os, subprocess, sys
sys.path.insert(0, sys.argv[2])
from runflow_worker.runtime.spawn import guard_parent
if os.getuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1: as an ordinary process starts
if sys.argv[1] == "guard":
    guard_parent()
seen = subprocess.run(["cat", f"/proc/{os.getpid()}/environ"], capture_output=True)
print("read" if b"S3CR3T" in seen.stdout else "denied")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
@pytest.mark.parametrize(("mode", "expected"), [("plain", "read"), ("guard", "denied")])
def test_a_child_of_the_same_user_cannot_read_a_guarded_workers_environment(
        mode: str, expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(ROOT)], check=False,
                         capture_output=True, text=True, timeout=30,
                         env={"WORKER_SECRET": "S3CR3T", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


# Calls the CLI's main with a harmless command, then reads the dumpable flag back.
CLI_SCRIPT = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1: as an ordinary process starts
before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
from runflow_worker.cli.main import main
code = main(["cache", "ls"])
print("dumpable", before, code, libc.prctl(3, 0, 0, 0, 0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_every_cli_command_runs_non_dumpable(tmp_path: Path) -> None:
    # Not only once a ComfyUI child is spawned: pip's build code and install.py run before.
    out = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(ROOT)], check=False,
                         capture_output=True, text=True, timeout=60,
                         env={"RUNFLOW_CACHE_DIR": str(tmp_path / "cache"),
                              "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "dumpable 1 0 0"
