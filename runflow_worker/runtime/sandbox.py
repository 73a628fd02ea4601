"""The bubblewrap command line that confines untrusted code (SPEC section 9).

Every custom node is hostile code, so the ComfyUI child and the environment builds (pip,
``install.py``) run inside ``bwrap`` (bubblewrap, the sandbox Flatpak uses; unprivileged,
through user namespaces). This module turns a ``SandboxPlan`` (plain data: what the process
may read, write and reach) into the argument list placed in front of the interpreter; it
starts nothing itself except ``probe``. ``docs/sandbox.md`` says what is visible and why.

What the sandbox shows:

- a whitelist of the filesystem, read-only: the system directories (``/usr``, ``/etc``,
  ``/bin``...; symlinks such as ``/lib -> usr/lib`` stay symlinks), the Python installation
  and every ``sys.path`` entry, the plan's own read-only paths (the environment);
- ``hidden`` paths (the cache volume) covered by an empty tmpfs wherever a read-only path
  contains them, so only the sub-paths bound after it (the run's own directories) show;
- the plan's ``writable`` paths read-write, a fresh tmpfs ``/tmp``, ``/dev`` basics and
  the GPU device nodes, its own ``/proc`` in its own PID namespace, no network unless
  ``network`` (then the host's);
- ``scratch_layers``: directories (ComfyUI's checkout) a pack may write into at import.
  bubblewrap 0.8 has no ``--overlay``, so the sandbox starts as root of its own user
  namespace with every capability, and a trusted first step (``/bin/sh`` running
  ``mount -t overlay`` with the upper layer on the sandbox's tmpfs) mounts the scratch
  layers, then ``setpriv`` drops every capability (bounding, inheritable and ambient sets)
  before the interpreter starts: no untrusted code ever runs with one. Writes land in the
  tmpfs and die with the sandbox.

Hand-written because no library builds bwrap command lines; the mount rules are this
project's.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
"""Bound read-only where they exist (a symlink is recreated as the same symlink)."""
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/dri")
"""Device nodes bound with ``--dev-bind`` where present (the NVIDIA driver, DRM)."""
SCRATCH_ROOT = "/tmp/.runflow-scratch"
"""Where the scratch layers' upper and work directories live (on the sandbox's tmpfs)."""
HOME = "/tmp"
"""``HOME`` inside the sandbox: the worker's own home is not visible there."""

# The trusted first step: mount each scratch layer, then drop every capability and exec the
# program. Arguments: the overlay count N, then N times (dir, upper, work), then the program.
_FIRST_STEP = r"""set -e
n=$1; shift
while [ "$n" -gt 0 ]; do
  mount -n -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1"
  shift 3; n=$((n - 1))
done
exec setpriv --bounding-set=-all --inh-caps=-all --ambient-caps=-all -- "$@"
"""
# Characters overlayfs's mount options cannot carry in a path.
_OVERLAY_UNSAFE = (",", ":", "\\", "=")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be started on this machine (the message says why)."""


@dataclass(frozen=True)
class SandboxPlan:
    """What one sandboxed process may see and reach; plain data (absolute paths)."""

    read_only: tuple[str, ...] = ()
    """Paths bound read-only (besides the system and the interpreter's own)."""
    writable: tuple[str, ...] = ()
    """Paths bound read-write at the same absolute path."""
    hidden: tuple[str, ...] = ()
    """Paths covered by an empty tmpfs wherever a bound path contains them (the cache
    volume): only the sub-paths bound explicitly are visible there."""
    scratch_layers: tuple[str, ...] = ()
    """Read-only directories given a writable scratch layer that dies with the sandbox."""
    fresh: tuple[str, ...] = ()
    """Directories emptied before each start (the child's own root): nothing a previous
    child left there reaches the next one."""
    network: bool = False
    """Share the host's network; otherwise only a private loopback."""
    chdir: str = "/"
    """Working directory inside the sandbox."""
    modules: tuple[str, ...] = ()
    """Top-level modules the sandboxed program imports besides the project's own (the
    child entry's); their package directories are bound read-only."""
    bwrap: str = "bwrap"


PROJECT_PACKAGES = ("runflow_worker",)
"""This project's package: the child imports its ``runtime`` and ``cache`` (its code only; the
rest of the package is code too, nothing the child could learn a secret from)."""


def interpreter_paths(modules: Sequence[str] = ()) -> tuple[str, ...]:
    """The Python installation, its site directories, and the packages the child imports.

    Bound: ``sys.base_prefix``, ``sys.prefix``, the interpreter's directory, every
    ``sys.path`` entry inside those or named ``site-packages``/``dist-packages``, and the
    directory (or file) of each of ``PROJECT_PACKAGES`` and ``modules`` (the child entry's
    top-level module), wherever they are imported from: a source checkout, an editable
    install's sources. Other ``sys.path`` entries are not bound: one may be the worker's
    working directory, or ``/``.
    """
    prefixes = [os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)]
    paths = [sys.base_prefix, sys.prefix, os.path.dirname(sys.executable)]
    for entry in sys.path:
        if not entry or not os.path.exists(entry):
            continue
        real = os.path.realpath(entry)
        if any(_inside(real, p) for p in prefixes) or os.path.basename(real) in (
                "site-packages", "dist-packages"):
            paths.append(entry)
    for name in (*PROJECT_PACKAGES, *modules):
        paths += _module_paths(name)
    return tuple(dict.fromkeys(os.path.abspath(p) for p in paths if os.path.exists(p)))


def _module_paths(name: str) -> list[str]:
    """Where the top-level module ``name`` is imported from (its package directory)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    return [spec.origin] if spec.origin and os.path.isabs(spec.origin) else []


def command_prefix(plan: SandboxPlan, env: Mapping[str, str]) -> list[str]:
    """The argv that runs a program (appended after it) inside the sandbox of ``plan``.

    The program gets exactly ``env`` (``--clearenv``, then each variable), with ``HOME``
    moved to the sandbox's ``/tmp`` unless it is writable there.
    """
    bwrap = shutil.which(plan.bwrap) or plan.bwrap
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
    if plan.network:
        args.append("--share-net")
    layers = _scratch_layers(plan)
    if layers:
        # Root of its own user namespace (mapped to the worker's user) with capabilities,
        # for the first step's mounts only: it drops them all before exec.
        args += ["--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "ALL"]
    else:
        # A worker running as root would otherwise leave every capability (in the sandbox's
        # user namespace) to the untrusted program: enough to remount a read-only bind
        # writable or unmount the tmpfs that hides the cache volume.
        args += ["--cap-drop", "ALL"]
    args += _system_mounts()
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for pattern in GPU_DEVICE_GLOBS:
        for dev in sorted(glob.glob(pattern)):
            args += ["--dev-bind", dev, dev]
    args += _path_mounts(plan)
    for i, _ in enumerate(layers):
        args += ["--dir", f"{SCRATCH_ROOT}/{i}/upper", "--dir", f"{SCRATCH_ROOT}/{i}/work"]
    args += ["--chdir", plan.chdir, "--clearenv"]
    child_env = dict(env)
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"  # the environment is read-only
    if not any(_inside(child_env.get("HOME", ""), w) for w in plan.writable):
        child_env["HOME"] = HOME
    for name, value in child_env.items():
        args += ["--setenv", name, value]
    args.append("--")
    if layers:
        args += ["/bin/sh", "-c", _FIRST_STEP, "runflow-sandbox", str(len(layers))]
        for i, layer in enumerate(layers):
            args += [layer, f"{SCRATCH_ROOT}/{i}/upper", f"{SCRATCH_ROOT}/{i}/work"]
    return args


def _system_mounts() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _path_mounts(plan: SandboxPlan) -> list[str]:
    """Binds and masks, shallowest first, so a deeper mount lands on top of its parent."""
    mounts: dict[str, str] = {}  # path -> "ro" | "rw" | "hide"
    bound: list[str] = []
    for path in (*interpreter_paths(plan.modules), *plan.read_only):
        if os.path.exists(path):
            mounts.setdefault(os.path.realpath(path), "ro")
            bound.append(os.path.abspath(path))
    for path in plan.writable:
        mounts[os.path.realpath(path)] = "rw"
    for path in plan.hidden:
        real = os.path.realpath(path)
        # Only where something bound contains it (or is it): elsewhere it is not visible.
        if mounts.get(real) == "ro" or (
                real not in mounts and any(_inside(real, m) for m in mounts)):
            mounts[real] = "hide"
    args: list[str] = []
    for path in sorted(mounts, key=lambda p: (p.rstrip("/").count("/"), p)):
        kind = mounts[path]
        enclosing = [m for m in mounts if m != path and _inside(path, m)]
        if kind == "ro" and enclosing and mounts[max(enclosing, key=len)] == "ro":
            continue  # already visible, read-only, through the enclosing bind
        if kind == "hide":
            args += ["--tmpfs", path]
        else:
            args += ["--ro-bind" if kind == "ro" else "--bind", path, path]
    # A bound path reached through a symlink (a venv's lib64 -> lib) keeps that name too,
    # unless a bound directory already holds the symlink itself.
    for path in dict.fromkeys(bound):
        real = os.path.realpath(path)
        if real != path and not any(_inside(path, m) for m in (*mounts, *SYSTEM_PATHS)):
            args += ["--symlink", real, path]
    return args


def _scratch_layers(plan: SandboxPlan) -> list[str]:
    """The scratch layers that can be mounted: existing directories holding no other mount
    (overlayfs does not show what is mounted below its lower directory)."""
    # A read-only bind inside a layer shows the same files through it; a writable or
    # hidden path would not be writable or hidden any more.
    others = {os.path.realpath(p) for p in (*plan.writable, *plan.hidden)}
    layers: list[str] = []
    for path in dict.fromkeys(os.path.realpath(p) for p in plan.scratch_layers):
        if not os.path.isdir(path) or any(ch in path for ch in _OVERLAY_UNSAFE):
            continue
        if any(_inside(o, path) and o != path for o in others):
            continue
        if any(_inside(path, layer) or _inside(layer, path) for layer in layers):
            continue
        layers.append(path)
    return layers


def scratch_layer_problems(plan: SandboxPlan) -> list[str]:
    """Why each requested scratch layer that will not be mounted is left out (for the log:
    such a directory stays read-only, and a pack writing into it fails its import)."""
    kept = _scratch_layers(plan)
    return [f"{p}: not a directory, a path overlayfs cannot name, or it holds another "
            "mounted path" for p in plan.scratch_layers
            if os.path.isdir(p) and not any(_inside(os.path.realpath(p), k) for k in kept)]


def _inside(path: str, base: str) -> bool:
    if not path or not base:
        return False
    base = base.rstrip("/") or "/"
    return path == base or path.startswith(base + "/") or base == "/"


def probe(bwrap: str = "bwrap", *, scratch: bool = True, timeout_s: float = 20.0) -> str:
    """Start one sandbox like the child's (``true`` inside); its description, or raise
    ``SandboxUnavailable`` saying why not (bwrap missing, user namespaces refused...)."""
    found = shutil.which(bwrap)
    if found is None:
        raise SandboxUnavailable(f"{bwrap} (bubblewrap) is not on the PATH")
    for tool in ("setpriv", "mount"):
        if scratch and shutil.which(tool) is None:
            raise SandboxUnavailable(f"{tool} (util-linux) is not on the PATH")
    plan = SandboxPlan(bwrap=found, scratch_layers=(sys.prefix,) if scratch else ())
    argv = [*command_prefix(plan, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}),
            "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"cannot start {found}: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")
        raise SandboxUnavailable(
            f"{found} cannot start a sandbox: {why.splitlines()[-1][:300]} (unprivileged "
            "user namespaces, or the mounts in them, are refused here; docs/sandbox.md)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    return f"{version or found} starts a sandbox (user, PID, network namespaces)"
