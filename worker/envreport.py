"""What a run's record says about the environment it ran in (``environment``, ``warnings``).

The ComfyUI commit the child reports, the environment key, the custom nodes that failed to
import, pinned nodes missing from a baked checkout, a ComfyUI commit other than the
deployed one, and the deployed packages (``workflow.environment.packages``) that the
environment has at other versions (``cache.packages``; docs/environments.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runtime.runner import RunnerConfig
from worker import contract as c

MAX_PACKAGE_DIFFERENCES = 200
"""The record lists at most this many; the warning names the first ten."""


class EnvironmentReport:
    """Describes runs' environments; reads an environment's packages once, not per run."""

    def __init__(self) -> None:
        self._installed: tuple[RunnerConfig, dict[str, str]] | None = None

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
        from cache.packages import built_versions, installed_versions, package_differences

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
