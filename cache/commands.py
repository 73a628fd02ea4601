"""Run an external command (git, pip) that a cancel callable can stop within a second.

Environment builds run ``git fetch`` and ``pip install``, which can take minutes; a run's
cancel or timeout must still stop them quickly. ``run_command`` waits on the child in short
slices, asking ``cancel()`` between them, and terminates (then kills) the child's whole
process group when it says stop. Output goes to temporary files, not pipes, so a chatty
command can never block on a full pipe while nobody reads it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cache.errors import BuildCanceled
from cache.progress import Cancel

POLL_S = 0.1
_KILL_GRACE_S = 5.0
_TAIL_CHARS = 4000


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a finished command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def error_tail(self) -> str:
        """The end of stderr (else stdout): what a failure message should quote."""
        text = (self.stderr.strip() or self.stdout.strip())
        return text[-_TAIL_CHARS:]


def run_command(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    cancel: Cancel | None = None,
    timeout_s: float | None = None,
) -> CommandResult:
    """Run ``args`` to completion and return its result (any exit status).

    Raises ``BuildCanceled`` when ``cancel()`` says stop, ``TimeoutError`` after
    ``timeout_s``, and ``OSError`` when the program cannot be started.
    """
    if cancel is not None and cancel():
        raise BuildCanceled(f"{Path(args[0]).name} not started: canceled")
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(args), cwd=cwd, env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
        )
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cancel is not None and cancel():
                    raise BuildCanceled(f"{Path(args[0]).name} stopped: canceled")
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{Path(args[0]).name} took longer than {timeout_s} s")
        finally:
            if proc.returncode is None:
                _stop(proc)
        out.seek(0)
        err.seek(0)
        return CommandResult(proc.returncode, out.read().decode(errors="replace"),
                             err.read().decode(errors="replace"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the command's process group, then kill it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
