"""Prepared environments: ComfyUI and custom nodes at pinned commits, their requirements.

An ``EnvironmentSpec`` is what a deployed workflow pins: ComfyUI's origin and commit, each
custom node's name, origin and commit, plus the Python and torch versions of this image. Its
``key`` (a hash of all of it) names one directory under ``<cache>/envs``::

    <key>/ComfyUI/                         worktree of ComfyUI at its commit
    <key>/ComfyUI/custom_nodes/<name>/     worktree of each custom node at its commit
    <key>/python/                          pip --prefix of the nodes' requirements
    (each with its bytecode, compiled at the build's end: ``cache.bytecode``)
    <key>/environment.json                 the spec it was built from, and its size
    <key>/READY                            written last: the environment is complete; its
                                           mtime is the environment's last use

Custom nodes sit inside the checkout's ``custom_nodes/``, exactly where a creator's local
ComfyUI has them (some nodes find files relative to that place).

Requirements: ComfyUI's ``requirements.txt`` (less the packages only its HTTP server uses)
and every custom node's are installed in one ``pip install --prefix`` with a constraints
file pinning every package of this interpreter to its installed version. Packages already installed are left alone (torch, torchvision, xformers
and the rest of the image never change); a requirement only a different version of an
installed package would satisfy fails the build with pip's explanation. The runner puts
the prefix's site-packages on the ComfyUI child's ``sys.path``.

Install scripts (``EnvironmentSpec.install_scripts``, off by default): a custom node's
``install.py`` is then run as ComfyUI-Manager runs it (``python install.py`` in the node's
directory). The pip it starts is held to the same prefix and constraints by pip's own
variables (``PIP_PREFIX``, ``PIP_CONSTRAINT``), and it inherits none of the worker's
credentials; nor does pip itself, which runs build code too (``cache.commands``'s scrub,
``PIP_*`` kept). A script that fails fails the build. Either way, a build that changed the
image's own packages fails.

Sandbox: with a ``BuildSandbox`` (the worker's default), pip and every ``install.py`` run
inside it (``runtime.sandbox``: the network allowed for the package index, writable only
the environment being built and a private ``/tmp``, the rest of the filesystem read-only,
nothing else of the cache volume visible). The git checkouts are not sandboxed: git runs no
code of the repositories it checks out. What a build leaves is hostile too: an environment
whose ComfyUI, ``custom_nodes/`` or site-packages lead out of it (a symlink; the child's
sandbox would bind its target) is refused, the worker replaces rather than writes through
whatever sits at the names of its own records, and a ComfyUI checkout whose
``custom_nodes`` or ``requirements.txt`` is a symlink fails the build.

Building takes a lock per key, so workers sharing the volume build an environment once; a
build that died half-way (no ``READY``) is removed and redone.

Eviction: whoever runs ComfyUI in an environment holds ``pin(key)`` (a shared lock of
``cache.pins``, held by any process on the volume) for as long as it does. ``gc`` removes the
least recently used unpinned environments beyond ``max_count``, and unpinned directories of
builds that died; ``prepare`` runs it after each new build. An environment is removed by
renaming it out of the way first, so it never looks complete half-deleted. The same gc then
removes the git mirrors that no environment left on the volume checks out from
(``GitMirrors.gc``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from runflow_worker.cache.bytecode import compile_environment
from runflow_worker.cache.commands import pip_environment, run_command
from runflow_worker.cache.errors import BuildCanceled, EnvironmentBuildError
from runflow_worker.cache.git import GitMirrors
from runflow_worker.cache.installer import PIP, UV, image_packages_in, image_shadow, install_argv
from runflow_worker.cache.packages import check_image_unchanged, image_packages
from runflow_worker.cache.pins import Pins
from runflow_worker.cache.progress import Cancel, held_or_cancel

PIP_TIMEOUT_S = 1800.0
INSTALL_SCRIPT_TIMEOUT_S = 1800.0
_KEY_HEX = 24
# Packages in ComfyUI's requirements.txt that only its HTTP server uses (scripts/install.sh
# and Dockerfile.cuda leave the same ones out of the image).
COMFYUI_SERVER_PACKAGES = frozenset({"comfyui-frontend-package", "comfyui-workflow-templates",
                                     "comfyui-embedded-docs", "alembic", "sqlalchemy"})
# What an install.py inherits of the worker's environment: locale, paths, proxies and pip's
# own settings, not the worker's credentials (Redis, S3, cloud). Then scrubbed as pip's
# environment is (``pip_environment``): a proxy URL with a password goes too.
_SCRIPT_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ",
                     "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                     "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "CUDA_HOME", "CUDA_PATH")


@dataclass(frozen=True)
class NodePin:
    """One custom node: the directory name under ``custom_nodes/``, origin and commit."""

    name: str
    origin: str
    commit: str


@dataclass(frozen=True)
class EnvironmentSpec:
    """What one environment holds; equal specs share one prepared environment."""

    comfyui_origin: str
    comfyui_commit: str
    custom_nodes: tuple[NodePin, ...] = ()
    python: str = field(default_factory=platform.python_version)
    torch: str | None = field(default_factory=lambda: _installed_version("torch"))
    install_scripts: bool = False
    """Run the custom nodes' ``install.py`` after their requirements (an operator's choice,
    ``RUNFLOW_RUN_INSTALL_SCRIPTS``)."""

    @property
    def key(self) -> str:
        """Hex digest naming the environment (custom node order does not matter)."""
        data = asdict(self)
        if data.pop("install_scripts"):
            # In the key only when on: environments built without scripts keep the keys
            # they had before the option existed, and the two kinds never share a directory.
            data["install_scripts"] = True
        data["comfyui_commit"] = self.comfyui_commit.lower()
        data["custom_nodes"] = sorted(
            [n.name, n.origin, n.commit.lower()] for n in self.custom_nodes)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:_KEY_HEX]


@dataclass(frozen=True)
class Environment:
    """A prepared environment: where its ComfyUI is and what goes on ``sys.path``."""

    key: str
    root: Path
    comfyui_dir: Path
    sys_path: tuple[Path, ...]

    @property
    def custom_nodes_dir(self) -> Path:
        """The checkout's ``custom_nodes/``."""
        return self.comfyui_dir / "custom_nodes"


@dataclass(frozen=True)
class EnvironmentInfo:
    """A directory under the environments' root, as ``ls`` reports it."""

    key: str
    path: Path
    ready: bool
    """False for a build in progress, or one that died."""
    last_used: float
    """Epoch seconds of the last ``prepare`` (of the directory's creation if never ready)."""
    size_bytes: int | None
    """Bytes the build left (the mirrors' shared objects not counted); None if unknown."""
    pinned: bool


@dataclass
class EnvironmentGcResult:
    """What a gc did: environments evicted, dead builds removed, pinned ones kept, mirrors
    no environment uses removed."""

    evicted: list[str] = field(default_factory=list)
    removed_incomplete: list[str] = field(default_factory=list)
    kept_pinned: list[str] = field(default_factory=list)
    remaining: int = 0
    mirrors_removed: list[str] = field(default_factory=list)


BuildSandbox = Callable[[Path, Mapping[str, str], Path], Sequence[str]]
"""``(writable_dir, env, cwd) -> argv prefix``: runs a build command sandboxed, writing only
``writable_dir``, with exactly ``env``, in ``cwd``."""


class Environments:
    """Prepares environments under ``root`` from git mirrors and the package index.

    ``max_count``: environments kept after a build (least recently used, unpinned ones go
    first); 0 keeps them all.
    """

    def __init__(
        self,
        root: Path,
        git: GitMirrors,
        *,
        pip_index_url: str | None = None,
        pip_find_links: Sequence[str] = (),
        python: str = sys.executable,
        max_count: int = 0,
        sandbox: BuildSandbox | None = None,
        installer: str = PIP,
        uv_bin: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.git = git
        self.pip_index_url = pip_index_url
        self.pip_find_links = tuple(pip_find_links)
        self.python = python
        self.max_count = max_count
        self.sandbox = sandbox
        # pip or uv (``cache.installer``): not in the key, both install the same
        # requirements under the same constraints; environment.json records which.
        self.installer = installer
        self.uv_bin = uv_bin
        self.pins = Pins(self.root / "pins")

    def _command(self, args: list[str], env_dir: Path, env: Mapping[str, str],
                 cwd: Path) -> list[str]:
        """``args``, inside the build sandbox when there is one (writing only ``env_dir``)."""
        if self.sandbox is None:
            return args
        return [*self.sandbox(env_dir, env, cwd), *args]

    def pin(self, key: str) -> AbstractContextManager[None]:
        """Keep the environment ``key`` from eviction for the duration of the block.

        Take it before ``prepare`` and hold it for as long as ComfyUI runs in the environment.
        """
        return self.pins.pin([key])

    def prepare(self, spec: EnvironmentSpec, *, cancel: Cancel | None = None) -> Environment:
        """Return the environment for ``spec``, building it first if needed.

        Raises ``GitError`` / ``EnvironmentBuildError`` when it cannot be built and
        ``BuildCanceled`` when ``cancel()`` stops the build.
        """
        key = spec.key
        env_dir = self.root / key
        # Pinned while checked or built, so a gc of another process cannot remove it
        # in between; the caller's own pin keeps it afterwards.
        with self.pin(key):
            if self._touch_ready(env_dir):
                return self._describe(key, env_dir)
            lock = FileLock(str(self.root / f"{key}.lock"))
            with held_or_cancel(lock, cancel, lambda: BuildCanceled(
                    f"canceled while waiting for another build of environment {key}")):
                if self._touch_ready(env_dir):  # another worker built it meanwhile
                    return self._describe(key, env_dir)
                if env_dir.exists():
                    shutil.rmtree(env_dir)  # a build that died half-way
                try:
                    self._build(spec, env_dir, cancel)
                except BaseException:
                    shutil.rmtree(env_dir, ignore_errors=True)
                    raise
            if self.max_count:
                self.gc(self.max_count)
        return self._describe(key, env_dir)

    def ls(self) -> list[EnvironmentInfo]:
        """Every environment directory, most recently used first."""
        infos = []
        for path in self._env_dirs():
            ready = path / "READY"
            try:
                last_used = (ready if ready.exists() else path).stat().st_mtime
            except FileNotFoundError:
                continue  # evicted meanwhile
            infos.append(EnvironmentInfo(path.name, path, ready.exists(), last_used,
                                         _recorded_size(path), self.pins.is_pinned(path.name)))
        infos.sort(key=lambda i: i.last_used, reverse=True)
        return infos

    def most_recent(self) -> Environment | None:
        """The most recently used complete environment (the one ``serve`` starts ComfyUI in
        before its first run), or None; its last use is not touched."""
        for info in self.ls():
            if info.ready:
                try:
                    return self._describe(info.key, info.path)
                except EnvironmentBuildError:
                    continue  # refused for every run too
        return None

    def gc(self, max_count: int | None = None) -> EnvironmentGcResult:
        """Keep at most ``max_count`` (default ``self.max_count``; 0: all) complete
        environments, evicting the least recently used unpinned ones, and remove unpinned
        directories of builds that died half-way; then remove the git mirrors that no
        remaining environment checks out from."""
        limit = self.max_count if max_count is None else max_count
        result = EnvironmentGcResult()
        ready = []
        for leftover in self.root.glob(".evicted-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a gc that died mid-delete
        for info in self.ls():
            if info.ready:
                ready.append(info)
            elif self._evict(info.key):
                result.removed_incomplete.append(info.key)
        excess = len(ready) - limit if limit else 0
        for info in reversed(ready):  # least recently used first
            if excess <= 0:
                break
            if self._evict(info.key):
                result.evicted.append(info.key)
                excess -= 1
            else:
                result.kept_pinned.append(info.key)
        result.mirrors_removed = self.git.gc()
        result.remaining = len(ready) - len(result.evicted)
        return result

    def _evict(self, key: str) -> bool:
        """Remove the environment ``key`` unless pinned; True if it was removed."""
        with self.pins.evicting(key) as free:
            if not free:
                return False
            env_dir = self.root / key
            # Out of the way first (atomic): nothing half-deleted ever looks ready.
            doomed = self.root / f".evicted-{key}-{uuid.uuid4().hex[:8]}"
            try:
                env_dir.rename(doomed)
            except FileNotFoundError:
                return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _env_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = []
        for path in self.root.iterdir():
            if len(path.name) == _KEY_HEX and path.is_dir():
                dirs.append(path)
        return dirs

    @staticmethod
    def _touch_ready(env_dir: Path) -> bool:
        """Mark the environment used now; False if it is not complete."""
        try:
            os.utime(env_dir / "READY")
        except FileNotFoundError:
            return False
        return True

    def _build(self, spec: EnvironmentSpec, env_dir: Path, cancel: Cancel | None) -> None:
        env_dir.mkdir(parents=True)
        comfy = env_dir / "ComfyUI"
        self.git.checkout(spec.comfyui_origin, spec.comfyui_commit, comfy, cancel=cancel)
        # The origin is any https repository: a symlink there would have the worker check
        # custom nodes out, or read a file, wherever it points.
        for name in ("custom_nodes", "requirements.txt"):
            if (comfy / name).is_symlink():
                raise EnvironmentBuildError(f"ComfyUI's {name} at {spec.comfyui_commit} is a "
                                            "symlink; refusing to follow it")
        requirements: list[tuple[str, Path]] = []
        if (comfy / "requirements.txt").is_file():
            # Another ComfyUI commit than the image's may need packages the image lacks.
            embedded = env_dir / "comfyui-requirements.txt"
            embedded.write_text(_without_server_packages(
                (comfy / "requirements.txt").read_text(errors="replace")))
            requirements.append(("ComfyUI", embedded))
        scripts: list[Path] = []
        for pin in sorted(spec.custom_nodes, key=lambda n: n.name):
            if not pin.name or pin.name in (".", "..") or "/" in pin.name or "\\" in pin.name:
                raise EnvironmentBuildError(f"custom node name {pin.name!r} is not a "
                                            "directory name")
            node_dir = comfy / "custom_nodes" / pin.name
            if node_dir.is_symlink():
                node_dir.unlink()
            elif node_dir.exists():  # the ComfyUI commit itself ships a directory of that name
                shutil.rmtree(node_dir)
            self.git.checkout(pin.origin, pin.commit, node_dir, cancel=cancel)
            if (node_dir / "requirements.txt").is_file():
                requirements.append((pin.name, node_dir / "requirements.txt"))
            if spec.install_scripts and (node_dir / "install.py").is_file():
                scripts.append(node_dir / "install.py")
        image = image_packages()
        constraints = env_dir / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in image))
        if requirements:
            self._install(requirements, env_dir, constraints, cancel)
        for script in scripts:  # after every requirement, as ComfyUI-Manager runs them
            self._run_install_script(script, env_dir, constraints, cancel)
        if requirements or scripts:
            check_image_unchanged(image, scripts)
            self._describe(spec.key, env_dir)  # the build's code left nothing linking out
        # The child's sandbox never writes bytecode: compiled here, once (cache.bytecode).
        compile_environment(env_dir, self.python, cancel=cancel,
                            wrap=lambda args, env: self._command(args, env_dir, env, env_dir))
        record = {"key": spec.key, "spec": asdict(spec), "size_bytes": _tree_bytes(env_dir),
                  "built_at": time.time(), "installer": self.installer}
        # The build's code could write here too: what it left at these names is replaced,
        # never written through (a symlink to the worker's files).
        _write_new(env_dir / "environment.json", json.dumps(record, indent=2))
        ready = env_dir / "READY.tmp"
        _write_new(ready, spec.key)
        os.replace(ready, env_dir / "READY")

    def _install(self, requirements: list[tuple[str, Path]], env_dir: Path, constraints: Path,
                 cancel: Cancel | None) -> None:
        prefix = env_dir / "python"
        args = install_argv(self.installer, python=self.python, prefix=prefix,
                            requirements=[path for _, path in requirements],
                            constraints=constraints, index_url=self.pip_index_url,
                            find_links=self.pip_find_links, uv_bin=self.uv_bin)
        # uv sees the image's packages as installed only through a shadow of their metadata
        # in the prefix (``cache.installer``); pip sees the interpreter's own.
        shadow = image_shadow(prefix) if self.installer == UV else nullcontext(set())
        try:
            with shadow as image:
                # The installer runs build code (an sdist's setup.py, a git+ requirement's
                # backend) with its environment: none of the worker's credentials, its own
                # PIP_* (uv: UV_*) kept. In the build sandbox its cache is the sandbox's
                # own (HOME is a tmpfs there): a build can never poison another's cache.
                env = pip_environment(os.environ,
                                      own_prefix="UV_" if self.installer == UV else "PIP_")
                result = run_command(self._command(args, env_dir, env, env_dir), cwd=env_dir,
                                     env=env, cancel=cancel, timeout_s=PIP_TIMEOUT_S)
        except TimeoutError as exc:
            raise EnvironmentBuildError("installing the requirements timed out") from exc
        except OSError as exc:
            raise EnvironmentBuildError(f"cannot run {self.installer}: {exc}") from exc
        if result.returncode != 0:
            names = ", ".join(name for name, _ in requirements)
            raise EnvironmentBuildError(
                f"installing the requirements of {names} failed ({self.installer}; packages "
                f"of the image are kept at their installed versions): {result.error_tail}")
        leaked = image_packages_in(prefix, image) if image else []
        if leaked:
            raise EnvironmentBuildError(
                f"{self.installer} installed packages of the image into the environment "
                f"({', '.join(leaked)}) instead of keeping the image's")

    def _run_install_script(self, script: Path, env_dir: Path, constraints: Path,
                            cancel: Cancel | None) -> None:
        """Run a custom node's ``install.py`` as ComfyUI-Manager does (``python install.py``
        in the node's directory), with every pip it starts held to the environment's prefix
        and constraints through pip's own ``PIP_*`` variables."""
        node = script.parent.name
        prefix = env_dir / "python"
        site = [str(p) for p in _site_dirs(prefix, existing_only=False)]
        env = pip_environment({name: value for name, value in os.environ.items()
                               if name in _SCRIPT_ENV_NAMES or name.startswith("PIP_")})
        env.update({
            "PYTHONPATH": os.pathsep.join(site),  # what the nodes' requirements installed
            "PYTHONNOUSERSITE": "1",
            "PIP_PREFIX": str(prefix),
            "PIP_CONSTRAINT": str(constraints),
            "PIP_NO_INPUT": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_WARN_SCRIPT_LOCATION": "1",
            "COMFYUI_PATH": str(env_dir / "ComfyUI"),
        })
        if self.pip_index_url:
            env["PIP_INDEX_URL"] = self.pip_index_url
        if self.pip_find_links:
            env["PIP_FIND_LINKS"] = " ".join(self.pip_find_links)
        try:
            result = run_command(
                self._command([self.python, script.name], env_dir, env, script.parent),
                cwd=script.parent, env=env, cancel=cancel, timeout_s=INSTALL_SCRIPT_TIMEOUT_S)
        except TimeoutError as exc:
            raise EnvironmentBuildError(f"install.py of {node} timed out") from exc
        except OSError as exc:
            raise EnvironmentBuildError(f"cannot run install.py of {node}: {exc}") from exc
        if result.returncode != 0:
            raise EnvironmentBuildError(
                f"install.py of {node} failed with exit code {result.returncode} (packages "
                f"of the image are kept at their installed versions): {result.error_tail}")

    def _describe(self, key: str, env_dir: Path) -> Environment:
        """The environment in ``env_dir``; ``EnvironmentBuildError`` when a directory the
        ComfyUI child's sandbox binds leads out of it (a build's code can replace any of
        them with a symlink, and the sandbox binds a path where it really is: a symlink to
        the worker's home would have that shown to the child)."""
        env = Environment(key, env_dir, env_dir / "ComfyUI",
                          _site_dirs(env_dir / "python", existing_only=True))
        root = env_dir.resolve()
        for path in (env.comfyui_dir, env.custom_nodes_dir, *env.sys_path):
            try:
                inside = path.resolve().is_relative_to(root)
            except (OSError, RuntimeError):  # a symlink loop
                inside = False
            if not inside:
                raise EnvironmentBuildError(
                    f"environment {key}: {path.relative_to(env_dir)} leads out of the "
                    "environment (a symlink its build left); refusing to use it")
        return env


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` into a new file at ``path``, removing whatever is there first (a
    symlink is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _without_server_packages(requirements: str) -> str:
    """ComfyUI's ``requirements.txt`` without the packages only its HTTP server uses (the
    frontend, templates and docs packages, the database stack): the worker embeds ComfyUI
    and never starts that server. Lines that are not plain requirements stay as they are."""
    kept = []
    for line in requirements.splitlines():
        try:
            name = canonicalize_name(Requirement(line.split("#", 1)[0].strip()).name)
        except InvalidRequirement:
            name = ""
        if name not in COMFYUI_SERVER_PACKAGES:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _site_dirs(prefix: Path, *, existing_only: bool) -> tuple[Path, ...]:
    """The site-packages directories of the pip prefix ``prefix``: those that exist, or with
    ``existing_only=False`` also those pip would create there."""
    paths: list[Path] = []
    for name in ("purelib", "platlib"):
        path = Path(sysconfig.get_path(name, vars={"base": str(prefix),
                                                    "platbase": str(prefix)}))
        if path not in paths and (path.is_dir() or not existing_only):
            paths.append(path)
    # pip's install scheme can differ from sysconfig's default one (distribution Pythons
    # patch theirs): add whatever site directory pip created.
    if prefix.exists():
        for path in sorted(prefix.glob("**/python3*/*-packages")):
            if path.is_dir() and path not in paths:
                paths.append(path)
    return tuple(paths)


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, links not followed."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _recorded_size(env_dir: Path) -> int | None:
    try:
        size = json.loads((env_dir / "environment.json").read_text()).get("size_bytes")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
