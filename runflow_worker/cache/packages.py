"""The Python packages an environment provides, where they differ from a deployment's, and
the check that a build left the image's own packages as they were (``check_image_unchanged``).

The deploy plugin records the versions installed on the creator's machine
(``workflow.environment.packages``). The worker does not install them: the environment key
leaves them out (SPEC section 5), and the image's packages are what every run gets. When a
workflow behaves differently on the worker than it did locally, a different version of a
package it uses is the usual suspect; ``package_differences`` lists those, for the record.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from runflow_worker.cache.errors import EnvironmentBuildError


@dataclass(frozen=True)
class PackageDifference:
    """A package installed both on the deploying machine and here, at other versions."""

    name: str
    deployed: str
    here: str


def installed_versions(paths: Sequence[str] | None = None) -> dict[str, str]:
    """Canonical name -> version of every distribution on ``paths`` (``sys.path`` when None).

    Where a package is installed in two places, the first on the path wins, as it does for
    an import.
    """
    found: dict[str, str] = {}
    dists = (importlib.metadata.distributions() if paths is None
             else importlib.metadata.distributions(path=list(paths)))
    for dist in dists:
        name = dist.metadata.get("Name")
        if name and dist.version:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def built_versions(paths: Sequence[str]) -> dict[str, str]:
    """Canonical name -> version of the distributions an environment build left on ``paths``,
    told by their ``<name>-<version>.dist-info`` directory names alone (the first on the
    path wins).

    Why not their ``METADATA``: the build ran hostile code, which may have left a FIFO there
    (the worker's read would block for good), a sparse file of terabytes, or a symlink to a
    file of the worker (read into a run's record). pip names every directory it installs
    that way (a wheel's, an sdist built into one), so the names say what the files would.
    """
    found: dict[str, str] = {}
    for path in paths:
        try:
            names = sorted(os.listdir(path))
        except OSError:
            continue
        for entry in names:
            stem = entry.removesuffix(".dist-info")
            name, sep, version = stem.partition("-")
            if stem != entry and sep and name and version:
                found.setdefault(canonicalize_name(name), version)
    return found


def package_differences(deployed: Iterable[tuple[str, str | None]],
                        installed: Mapping[str, str]) -> list[PackageDifference]:
    """The deployed packages installed here at another version, sorted by name.

    ``installed`` is what ``installed_versions`` returns. Versions are compared as PEP 440
    versions (``2.1`` equals ``2.1.0``; a local label such as ``+cu124`` counts), and as
    strings where either is not one. Packages not installed here, and entries without a
    version, are left out: a creator's machine holds many packages no workflow imports, and
    a custom node that misses one fails to import, which the record reports already.
    """
    differences: dict[str, PackageDifference] = {}
    for name, version in deployed:
        here = installed.get(canonicalize_name(name))
        if version and here is not None and not _same_version(version, here):
            differences.setdefault(canonicalize_name(name),
                                   PackageDifference(name, version, here))
    return sorted(differences.values(), key=lambda d: canonicalize_name(d.name))


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a.strip() == b.strip()


def check_image_unchanged(before: list[tuple[str, str]], scripts: list[Path]) -> None:
    """Raise ``EnvironmentBuildError`` if the image's own packages differ from ``before``.

    Constraints keep pip from replacing them, but a script can still run ``pip install
    --force-reinstall`` or ``pip uninstall`` where the worker may write the image's
    site-packages; a build that did so fails loudly instead of leaving every environment on
    a silently changed image.
    """
    importlib.invalidate_caches()
    now = dict(image_packages())
    changes = []
    for name, version in before:
        if name not in now:
            changes.append(f"{name} {version} removed")
        elif now[name] != version:
            changes.append(f"{name} {version} -> {now[name]}")
    if changes:
        ran = ", ".join(f"install.py of {p.parent.name}" for p in scripts)
        raise EnvironmentBuildError(
            "the build changed packages of the image (" + "; ".join(changes) + ")"
            + (f" while running {ran}" if ran else "")
            + ": the worker's image needs repair, and its site-packages should not be "
              "writable by the worker")


def image_packages() -> list[tuple[str, str]]:
    """``(canonical name, version)`` of every distribution this interpreter has installed."""
    return sorted(installed_versions().items())
