"""What a run's record says about the environment it ran in (``environment``, ``warnings``),
and whether the environment is fit to run the workflow at all.

The ComfyUI commit the child reports, the environment key, the custom node packs loaded
(with their commits) and those that failed to import, pinned nodes missing from a baked
checkout, a ComfyUI commit other than the deployed one, and the deployed packages
(``workflow.environment.packages``) that the environment has at other versions
(``cache.packages``; docs/environments.md).

A pack the workflow declares that failed to import fails the run (``pack_failure``): packs
patch ComfyUI when imported (samplers, attention, model loading), so a run without one can
differ from the creator's even when the graph uses none of its nodes.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from runflow_worker.errors import ErrorCode, RunFailure
from runflow_worker.run import contract as c
from runflow_worker.runtime.redact import redact
from runflow_worker.runtime.runner import RunnerConfig

MAX_PACKAGE_DIFFERENCES = 200
"""The record lists at most this many; the warning names the first ten."""
MAX_IMPORT_ERROR_CHARS = 4000
"""Of each failed pack's logged error, in the record's error details."""
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*:( |$)")


def pack_entries(custom_node_dirs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(entry, path)`` of every pack ComfyUI loads from ``custom_node_dirs``, by its rules:
    directories and ``.py`` files, not ``__pycache__`` nor ``*.disabled``."""
    out: list[tuple[str, Path]] = []
    for root in custom_node_dirs:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            path = Path(root) / entry
            if entry == "__pycache__" or entry.endswith(".disabled"):
                continue
            if path.is_dir() or entry.endswith(".py"):
                out.append((entry, path))
    return out


def head_commit(path: Path) -> str | None:
    """The commit a git checkout (or worktree) at ``path`` has checked out, read from its
    files: running git in a pack's directory would honour the pack's own git config."""
    try:
        git = path / ".git"
        if git.is_file():  # a worktree: "gitdir: <its directory in the repository>"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = (path / text.removeprefix("gitdir:").strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if len(head) == 40 else None
        ref = head.removeprefix("ref:").strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref and len(sha) == 40:
                    return sha
    except (OSError, ValueError):
        return None
    return None


def _declared(entry: str, declared: set[str]) -> str | None:
    """The declared pack name an entry of ``custom_nodes/`` is, or None."""
    if entry in declared:
        return entry
    stem = entry.removesuffix(".py")
    return stem if stem in declared else None


def _last_line(text: str) -> str:
    """The exception line of a logged traceback (``RuntimeError: ...``), else the last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if exceptions:
        return exceptions[-1].strip()
    return lines[-1].strip() if lines else "no error logged"


class EnvironmentReport:
    """Describes runs' environments; reads an environment's packages once, not per run."""

    def __init__(self) -> None:
        self._installed: tuple[RunnerConfig, dict[str, str]] | None = None
        self._packs: tuple[RunnerConfig, list[dict[str, Any]]] | None = None

    def pack_failure(self, message: c.RunMessage, ready: Any) -> RunFailure | None:
        """``ENVIRONMENT_FAILED`` naming the workflow's declared packs that failed to import
        (with the first and last lines of what their import logged), or None."""
        if ready is None:
            return None
        declared = set(message.workflow.custom_nodes)
        errors = getattr(ready, "import_errors", None) or {}
        broken: dict[str, str] = {}
        for entry in ready.import_failures:
            name = _declared(entry, declared)
            if name is not None:
                text = redact(str(errors.get(entry) or "no error logged"))
                broken[name] = text[-MAX_IMPORT_ERROR_CHARS:]
        if not broken:
            return None
        shown = "; ".join(f"{name!r}: {_last_line(text)}" for name, text in broken.items())
        noun = "pack" if len(broken) == 1 else "packs"
        return RunFailure(ErrorCode.ENVIRONMENT_FAILED,
                          f"custom node {noun} failed to import: {shown}",
                          details={"import_errors": broken})

    def _loaded_packs(self, config: RunnerConfig,
                      failures: tuple[str, ...]) -> list[dict[str, Any]]:
        """The packs loaded (every entry but the failures), with their checked-out commits."""
        if self._packs is None or self._packs[0] != config:
            self._packs = (config, [
                {"name": entry, "commit": head_commit(path)}
                for entry, path in pack_entries(config.custom_node_dirs)])
        return [dict(p) for p in self._packs[1] if p["name"] not in failures]

    def describe(self, message: c.RunMessage, config: RunnerConfig, ready: Any,
                 comfyui_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """``(environment, warnings)`` of a run executed with ``config``; ``ready`` is the
        child's Ready message (None when it sent none)."""
        environment: dict[str, Any] = {}
        warnings: list[str] = []
        if ready is not None:
            actual = ready.comfyui_commit
            wanted = message.workflow.environment.comfyui.commit
            environment = {"comfyui_commit": actual, "env_key": config.env_key,
                           "custom_nodes": self._loaded_packs(config,
                                                              tuple(ready.import_failures)),
                           "import_failures": list(ready.import_failures)}
            for name in message.workflow.custom_nodes:
                if not (comfyui_dir / "custom_nodes" / name).exists():
                    warnings.append(f"custom node {name!r} is not in the baked ComfyUI checkout")
            if wanted and actual != wanted:
                warnings.append(f"ComfyUI commit mismatch: the workflow was deployed with "
                                f"{wanted}, this worker runs {actual or 'an unknown commit'}")
        if message.workflow.environment.packages:
            warning = self._package_differences(message, config, environment)
            if warning:
                warnings.append(warning)
        return environment, warnings

    def _package_differences(self, message: c.RunMessage, config: RunnerConfig,
                             environment: dict[str, Any]) -> str | None:
        from runflow_worker.cache.packages import (
            built_versions,
            installed_versions,
            package_differences,
        )

        if self._installed is None or self._installed[0] != config:
            # The child imports from the environment's directories first, then the image's.
            # The environment's are read by name only: a hostile build wrote them.
            found = built_versions(config.extra_sys_path)
            for name, version in installed_versions(sys.path).items():
                found.setdefault(name, version)
            self._installed = (config, found)
        differences = package_differences(
            ((pin.name, pin.version) for pin in message.workflow.environment.packages),
            self._installed[1])
        if not differences:
            return None
        environment["package_differences"] = [
            {"name": d.name, "deployed": d.deployed, "here": d.here}
            for d in differences[:MAX_PACKAGE_DIFFERENCES]]
        shown = ", ".join(f"{d.name} {d.deployed} -> {d.here}" for d in differences[:10])
        more = f" and {len(differences) - 10} more" if len(differences) > 10 else ""
        return ("packages at other versions than on the deploying machine (deployed -> here): "
                f"{shown}{more}")
