"""Run an external command (git, pip) that a cancel callable can stop within a second.

Environment builds run ``git fetch`` and ``pip install``, which can take minutes; a run's
cancel or timeout must still stop them quickly. ``run_command`` waits on the child in short
slices, asking ``cancel()`` between them, and terminates (then kills) the child's whole
process group when it says stop. Output goes to temporary files, not pipes, so a chatty
command can never block on a full pipe while nobody reads it. Only the last
``OUTPUT_KEEP_BYTES`` of each stream are read back, as text (decoded leniently): pip's and
an ``install.py``'s output is whatever their code prints, and it is only ever quoted.

It also holds the credential scrub of every process that runs code the worker did not
write: the ComfyUI child (``runtime.spawn``), pip (a source distribution's or a ``git+``
requirement's build code), a custom node's ``install.py``. ``is_secret_name`` drops by name,
``has_url_credentials`` by value (a URL with credentials in it), ``scrubbed_environment``
applies both.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runflow_worker.cache.errors import BuildCanceled
from runflow_worker.cache.progress import Cancel

POLL_S = 0.1
_KILL_GRACE_S = 5.0
_TAIL_CHARS = 4000
OUTPUT_KEEP_BYTES = 1 << 20
"""The most of a command's stdout, and of its stderr, read back into memory (the end)."""

_DROP_PREFIXES = ("RUNFLOW_", "AWS_")
_DROP_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "PRIVATE_KEY",
               "CONNECTION_STRING", "AUTH")
_DROP_SUFFIXES = ("_KEY", "_PASS", "_PWD")
# ``scheme://user:password@``: a non-empty password in a URL's userinfo, anywhere in a value
# (a list of URLs too). Userinfo holds no ``/ ? #`` (RFC 3986), so ``https://host:8080/@x``
# is no credential. The user may be empty (``redis://:pw@host``).
# A URL with user information: a password, or a user name alone, which is where GitHub and
# others put a personal access token (``https://<token>@github.com/...``).
_URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#@]+@", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for variables that processes running foreign code never get unless passed.

    ``RUNFLOW_*`` (the worker's own settings: Redis URL, webhook secret; nothing else reads
    them), ``AWS_*``, and names containing SECRET, TOKEN, PASSWORD, PASSWD, CREDENTIAL,
    APIKEY, PRIVATE_KEY, CONNECTION_STRING or AUTH or ending with ``_KEY``, ``_PASS`` or
    ``_PWD`` (any case).
    """
    upper = name.upper()
    return (upper.startswith(_DROP_PREFIXES) or upper.endswith(_DROP_SUFFIXES)
            or any(part in upper for part in _DROP_PARTS))


def has_url_credentials(value: str) -> bool:
    """True when ``value`` holds a URL with user information (``https://user:tok@index/simple``,
    ``http://u:p@proxy:3128``, ``https://<token>@github.com/x``): a credential whatever the
    variable's name."""
    return _URL_CREDENTIALS.search(value) is not None


def scrubbed_environment(environ: Mapping[str, str], passed: Iterable[str] = (),
                         extra: Mapping[str, str] | None = None, *,
                         keep_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """``environ`` less secret names and values holding URL credentials, plus ``extra``.

    Names in ``passed`` and names starting with one of ``keep_prefixes`` are kept whatever
    they hold (a passed name that is not set is simply absent); ``extra`` is added as is.
    """
    keep = set(passed)
    env = {k: v for k, v in environ.items()
           if k in keep or k.startswith(keep_prefixes)
           or not (is_secret_name(k) or has_url_credentials(v))}
    env.update(extra or {})
    return env


OPENMP_WAIT_NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""Variables that say how OpenMP's idle threads wait (GNU's and Intel's runtimes)."""

CHILD_OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
"""The child's OpenMP threads sleep as soon as a parallel region ends, unless the worker's
environment says otherwise. By default GNU OpenMP (torch's CPU runtime) spins each idle
thread for ~300,000 rounds after every region, so a warm run left a core busy for
milliseconds after its last node, the core the worker needs to store the outputs and
report the run (``docs/runtime.md``, "The child's environment and logs")."""


def child_environment(environ: Mapping[str, str], passed: Iterable[str] = (),
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ComfyUI child's environment: ``environ`` scrubbed, plus ``passed`` and ``extra``,
    and ``CHILD_OPENMP_WAIT`` unless one of ``OPENMP_WAIT_NAMES`` is set.

    Everything else stays (PATH, HOME, CUDA_*, PYTORCH_*, HF_HOME, proxies without a
    password, locale...). ``passed`` (the operator's ``RUNFLOW_CHILD_ENV_PASS``) keeps a
    variable the scrub would drop, e.g. ``HF_TOKEN``.
    """
    env = scrubbed_environment(environ, passed, extra)
    if not any(name in env for name in OPENMP_WAIT_NAMES):
        env.update(CHILD_OPENMP_WAIT)
    return env


def pip_environment(environ: Mapping[str, str],
                    extra: Mapping[str, str] | None = None, *,
                    own_prefix: str = "PIP_") -> dict[str, str]:
    """What pip runs with: ``environ`` scrubbed, but every ``PIP_*`` kept as it is.

    pip runs build code (a source distribution's, a ``git+`` requirement's) that must not
    get the worker's credentials; its own ``PIP_*`` settings stay, index credentials
    included, since pip cannot fetch without them. A proxy with a password is dropped like
    any URL credentials: ``PIP_PROXY`` gives pip one. ``own_prefix="UV_"``: the same for uv,
    whose settings are its ``UV_*`` (and pip's are scrubbed as anything else).
    """
    return scrubbed_environment(environ, extra=extra, keep_prefixes=(own_prefix,))


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
        return CommandResult(proc.returncode, _tail(out), _tail(err))


def _tail(fh: IO[bytes], max_bytes: int | None = None) -> str:
    """The last ``max_bytes`` (``OUTPUT_KEEP_BYTES``) of ``fh`` as text, marked when cut."""
    max_bytes = OUTPUT_KEEP_BYTES if max_bytes is None else max_bytes
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - max_bytes)
    fh.seek(start)
    text = fh.read(max_bytes).decode(errors="replace")
    return f"[{start} bytes cut]\n{text}" if start else text


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
