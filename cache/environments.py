"""Prepared environments: ComfyUI and custom nodes at pinned commits, their requirements.

An ``EnvironmentSpec`` is what a deployed workflow pins: ComfyUI's origin and commit, each
custom node's name, origin and commit, plus the Python and torch versions of this image. Its
``key`` (a hash of all of it) names one directory under ``<cache>/envs``::

    <key>/ComfyUI/                         worktree of ComfyUI at its commit
    <key>/ComfyUI/custom_nodes/<name>/     worktree of each custom node at its commit
    <key>/python/                          pip --prefix of the nodes' requirements
    <key>/environment.json                 the spec it was built from
    <key>/READY                            written last: the environment is complete

Custom nodes sit inside the checkout's ``custom_nodes/``, exactly where a creator's local
ComfyUI has them (some nodes find files relative to that place).

Requirements: every custom node's ``requirements.txt`` is installed in one ``pip install
--prefix`` with a constraints file pinning every package of this interpreter to its
installed version. Packages already installed are left alone (torch, torchvision, xformers
and the rest of the image never change); a requirement only a different version of an
installed package would satisfy fails the build with pip's explanation. The runner puts
the prefix's site-packages on the ComfyUI child's ``sys.path``.

Building takes a lock per key, so workers sharing the volume build an environment once; a
build that died half-way (no ``READY``) is removed and redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from cache.commands import run_command
from cache.errors import EnvironmentBuildError
from cache.git import GitMirrors
from cache.progress import Cancel

PIP_TIMEOUT_S = 1800.0
_KEY_HEX = 24


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

    @property
    def key(self) -> str:
        """Hex digest naming the environment (custom node order does not matter)."""
        data = asdict(self)
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


class Environments:
    """Prepares environments under ``root`` from git mirrors and the package index."""

    def __init__(
        self,
        root: Path,
        git: GitMirrors,
        *,
        pip_index_url: str | None = None,
        pip_find_links: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        self.root = Path(root)
        self.git = git
        self.pip_index_url = pip_index_url
        self.pip_find_links = tuple(pip_find_links)
        self.python = python

    def prepare(self, spec: EnvironmentSpec, *, cancel: Cancel | None = None) -> Environment:
        """Return the environment for ``spec``, building it first if needed.

        Raises ``GitError`` / ``EnvironmentBuildError`` when it cannot be built and
        ``BuildCanceled`` when ``cancel()`` stops the build.
        """
        key = spec.key
        env_dir = self.root / key
        if (env_dir / "READY").exists():
            return self._describe(key, env_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            if (env_dir / "READY").exists():  # another worker built it meanwhile
                return self._describe(key, env_dir)
            if env_dir.exists():
                shutil.rmtree(env_dir)  # a build that died half-way
            try:
                self._build(spec, env_dir, cancel)
            except BaseException:
                shutil.rmtree(env_dir, ignore_errors=True)
                raise
        return self._describe(key, env_dir)

    def _build(self, spec: EnvironmentSpec, env_dir: Path, cancel: Cancel | None) -> None:
        env_dir.mkdir(parents=True)
        comfy = env_dir / "ComfyUI"
        self.git.checkout(spec.comfyui_origin, spec.comfyui_commit, comfy, cancel=cancel)
        requirements: list[Path] = []
        for pin in sorted(spec.custom_nodes, key=lambda n: n.name):
            if not pin.name or pin.name in (".", "..") or "/" in pin.name or "\\" in pin.name:
                raise EnvironmentBuildError(f"custom node name {pin.name!r} is not a "
                                            "directory name")
            node_dir = comfy / "custom_nodes" / pin.name
            if node_dir.exists():  # the ComfyUI commit itself ships a directory of that name
                shutil.rmtree(node_dir)
            self.git.checkout(pin.origin, pin.commit, node_dir, cancel=cancel)
            if (node_dir / "requirements.txt").is_file():
                requirements.append(node_dir / "requirements.txt")
        if requirements:
            self._install(requirements, env_dir, cancel)
        (env_dir / "environment.json").write_text(json.dumps(asdict(spec), indent=2))
        ready = env_dir / "READY.tmp"
        ready.write_text(spec.key)
        os.replace(ready, env_dir / "READY")

    def _install(self, requirements: list[Path], env_dir: Path, cancel: Cancel | None) -> None:
        constraints = env_dir / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n"
                                       for name, version in _installed_packages()))
        args = [self.python, "-m", "pip", "install", "--prefix", str(env_dir / "python"),
                "--no-input", "--disable-pip-version-check", "--no-warn-script-location",
                "--constraint", str(constraints)]
        for path in requirements:
            args += ["--requirement", str(path)]
        if self.pip_index_url:
            args += ["--index-url", self.pip_index_url]
        for link in self.pip_find_links:
            args += ["--find-links", link]
        try:
            result = run_command(args, cwd=env_dir, cancel=cancel, timeout_s=PIP_TIMEOUT_S)
        except TimeoutError as exc:
            raise EnvironmentBuildError("installing custom node requirements timed out") from exc
        except OSError as exc:
            raise EnvironmentBuildError(f"cannot run pip: {exc}") from exc
        if result.returncode != 0:
            names = ", ".join(p.parent.name for p in requirements)
            raise EnvironmentBuildError(
                f"installing the requirements of {names} failed (packages of the image are "
                f"kept at their installed versions): {result.error_tail}")

    def _describe(self, key: str, env_dir: Path) -> Environment:
        prefix = env_dir / "python"
        paths: list[Path] = []
        if prefix.exists():
            for name in ("purelib", "platlib"):
                path = Path(sysconfig.get_path(name, vars={"base": str(prefix),
                                                            "platbase": str(prefix)}))
                if path.is_dir() and path not in paths:
                    paths.append(path)
            if not paths:
                # pip's install scheme can differ from sysconfig's default one (distribution
                # Pythons patch theirs): take whatever site directory pip created.
                paths = sorted(p for p in prefix.glob("**/python3*/*-packages") if p.is_dir())
        return Environment(key, env_dir, env_dir / "ComfyUI", tuple(paths))


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed_packages() -> list[tuple[str, str]]:
    """``(name, version)`` of every distribution this interpreter has installed."""
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name and dist.version and name.lower() not in seen:
            seen[name.lower()] = dist.version
    return sorted(seen.items())
