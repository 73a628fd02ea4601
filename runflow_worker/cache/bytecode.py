"""Bytecode for a prepared environment, compiled once when it is built.

The ComfyUI child runs with its environment read-only and ``PYTHONDONTWRITEBYTECODE`` set
(``runtime.sandbox``): nothing it imports is ever cached as bytecode there. A git checkout
holds no bytecode, nor does what uv installs (pip compiles what it installs), so a child in
a freshly built environment compiled every module of ComfyUI, of its custom nodes and of
their packages from source at every start: 0.6 s of a sandboxed child's start on a 2-core
machine for ComfyUI's own files alone (``docs/environments.md``), and a switch to a built
environment cost that on top of the child's start. The build now compiles the
environment's ComfyUI checkout (its ``custom_nodes/`` included) and its installed packages
with the standard library's ``compileall``, inside the build sandbox like the installer, so
every later child reads bytecode.

Compiling parses source and runs none of it (a custom node's code included). A file that
does not compile (Python 2, a template named ``.py``) is left without bytecode: importing
it fails or compiles as it would have without this step. Symlinked directories are not
followed (``compileall``'s own rule). The bytecode is checked against its source's
modification time and size at import, Python's default, so a changed source file is never
run from stale bytecode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runflow_worker.cache.commands import run_command
from runflow_worker.cache.errors import EnvironmentBuildError
from runflow_worker.cache.progress import Cancel

COMPILE_TIMEOUT_S = 900.0

# What the compiler inherits of the worker's environment: a path and a locale, nothing
# else (no credential, and no SOURCE_DATE_EPOCH, which would switch the bytecode's check
# from the source's timestamp to a hash of it, read at every import).
_ENV_NAMES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR")

Wrap = Callable[[list[str], Mapping[str, str]], list[str]]
"""Turns a command line and its environment into the one that runs it (in a sandbox)."""


def compile_argv(python: str, dirs: Sequence[Path]) -> list[str]:
    """The command line compiling every ``.py`` file under ``dirs`` for ``python``, on all
    cores, printing nothing (a file that fails is skipped; the exit status then is 1)."""
    return [python, "-m", "compileall", "-qq", "-j", "0", *(str(d) for d in dirs)]


def compiler_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The compiler's environment variables, taken from ``environ``."""
    env = {name: environ[name] for name in _ENV_NAMES if name in environ}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def bytecode_dirs(env_dir: Path) -> list[Path]:
    """What to compile in the environment at ``env_dir``: its ComfyUI checkout and its
    installed packages (the prefix), those that exist."""
    return [d for d in (env_dir / "ComfyUI", env_dir / "python") if d.is_dir()]


def compile_environment(env_dir: Path, python: str, *, wrap: Wrap,
                        cancel: Cancel | None = None) -> None:
    """Compile the Python files of the environment at ``env_dir`` for ``python``.

    ``wrap(args, env)`` returns the command line that runs ``args`` (the build sandbox's).
    A file that does not compile is skipped; ``EnvironmentBuildError`` when the compiler
    cannot run or times out, ``BuildCanceled`` when ``cancel()`` says stop.
    """
    env = compiler_environment(os.environ)
    args = compile_argv(python, bytecode_dirs(env_dir))
    try:
        run_command(wrap(args, env), cwd=env_dir, env=env, cancel=cancel,
                    timeout_s=COMPILE_TIMEOUT_S)
    except TimeoutError as exc:
        raise EnvironmentBuildError("compiling the environment's bytecode timed out") from exc
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot run {python} to compile bytecode: {exc}") from exc


def has_bytecode(source: Path) -> bool:
    """Whether ``source`` (a ``.py`` file) has bytecode for this interpreter beside it, in
    its ``__pycache__`` (current or not: a check of presence, not of freshness)."""
    import importlib.util

    try:
        return os.path.isfile(importlib.util.cache_from_source(os.fspath(source)))
    except NotImplementedError:  # an interpreter that caches no bytecode
        return False
