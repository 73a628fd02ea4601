"""Which program installs an environment's requirements, and its command line: pip or uv.

Both install into the environment's prefix (``<key>/python``) under the same constraints
file (every package of the image at its installed version) with the same index settings, and
run with the same scrubbed environment (``cache.commands.pip_environment``: no worker
credentials; pip keeps its ``PIP_*``, uv its ``UV_*``). ``uv`` (``uv pip install``) resolves
and installs the same requirements several times faster (``bench/bench_env_build.py``);
``RUNFLOW_ENV_INSTALLER`` chooses, and uv is the default where it is installed (the project
depends on the ``uv`` package, so it is).

pip counts the interpreter's installed packages as installed even with ``--prefix``: a
requirement the image already satisfies is left alone. uv, given ``--prefix``, sees only
what is inside the prefix, and would resolve torch and the rest of the image from the index
(gigabytes, or no solution for a local build such as ``+cu124``). So before uv runs, the
prefix's site-packages gets a *shadow* of the image: one ``<name>-<version>.dist-info``
directory holding only the distribution's ``METADATA`` per installed package. uv then sees
the image's packages as installed at their versions (a requirement they satisfy is kept, one
they do not fails with uv's explanation, as pip's does), installs only the rest, and the
shadow is removed afterwards. A build that put a package of the image into the prefix anyway
fails (``image_packages_in``).

uv installs with ``--link-mode=copy``: its default hard links would share files between its
cache and every environment, so a custom node patching a package in one environment would
patch them all. Unlike pip, uv compiles no bytecode; the environment's build compiles what
either installed at its end (``cache.bytecode``: the child, read-only, never could).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sysconfig
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from packaging.utils import canonicalize_name

PIP = "pip"
UV = "uv"
INSTALLERS = (PIP, UV)


def find_uv() -> str | None:
    """The ``uv`` executable: the one the ``uv`` package installed, else one on ``PATH``."""
    try:
        import uv  # the PyPI package ships the binary beside this interpreter's scripts

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def resolve_installer(choice: str | None) -> tuple[str, str | None]:
    """``(installer, uv executable or None)`` for ``RUNFLOW_ENV_INSTALLER`` (None: uv where
    it is installed, else pip). Raises ``ValueError`` for an unknown choice, or uv asked for
    where it is not installed."""
    name = (choice or "").strip().lower() or None
    if name is not None and name not in INSTALLERS:
        raise ValueError(f"unknown installer {choice!r} (expected uv or pip)")
    if name == PIP:
        return PIP, None
    uv_bin = find_uv()
    if uv_bin is None:
        if name == UV:
            raise ValueError("uv is not installed (pip install uv, or choose pip)")
        return PIP, None
    return UV, uv_bin


def install_argv(
    installer: str,
    *,
    python: str,
    prefix: Path,
    requirements: Sequence[Path],
    constraints: Path,
    index_url: str | None = None,
    find_links: Sequence[str] = (),
    uv_bin: str | None = None,
) -> list[str]:
    """The command line installing ``requirements`` into ``prefix`` for ``python``."""
    if installer == UV:
        if uv_bin is None:
            raise ValueError("no uv executable given")
        args = [uv_bin, "pip", "install", "--python", python, "--prefix", str(prefix),
                "--link-mode", "copy", "--no-progress", "--constraint", str(constraints)]
    else:
        args = [python, "-m", "pip", "install", "--prefix", str(prefix), "--no-input",
                "--disable-pip-version-check", "--no-warn-script-location",
                "--constraint", str(constraints)]
    for path in requirements:
        args += ["--requirement", str(path)]
    if index_url:
        args += ["--index-url", index_url]
    for link in find_links:
        args += ["--find-links", link]
    return args


def prefix_site_dir(prefix: Path) -> Path:
    """Where an installer lays out pure-Python packages under ``prefix`` (the ``venv``
    scheme, which is how uv treats a prefix)."""
    scheme = "venv" if "venv" in sysconfig.get_scheme_names() else sysconfig.get_default_scheme()
    return Path(sysconfig.get_path("purelib", scheme,
                                   vars={"base": str(prefix), "platbase": str(prefix)}))


@contextmanager
def image_shadow(prefix: Path,
                 distributions: Sequence[importlib.metadata.Distribution] | None = None,
                 ) -> Iterator[set[str]]:
    """The image's distributions as metadata-only ``.dist-info`` directories in ``prefix``'s
    site-packages for the duration of the block (see the module docstring); yields the
    canonical names shadowed. The directories are removed afterwards, whatever happened."""
    site = prefix_site_dir(prefix)
    site.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    names: set[str] = set()
    try:
        for dist in distributions if distributions is not None else _image_distributions():
            name = dist.metadata["Name"] if dist.metadata else None
            if not name or not dist.version:
                continue
            canonical = canonicalize_name(name)
            if canonical in names:
                continue  # the first on the path wins, as for imports
            text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or (
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {dist.version}\n")
            shadow = site / f"{canonical.replace('-', '_')}-{dist.version}.dist-info"
            if shadow.exists():
                continue
            shadow.mkdir()
            made.append(shadow)
            (shadow / "METADATA").write_text(text)
            names.add(canonical)
        yield names
    finally:
        for shadow in made:
            shutil.rmtree(shadow, ignore_errors=True)


def image_packages_in(prefix: Path, image: set[str]) -> list[str]:
    """Canonical names of ``image`` packages that have a distribution inside ``prefix``."""
    found: list[str] = []
    site = prefix_site_dir(prefix)
    if not site.is_dir():
        return found
    for dist in importlib.metadata.distributions(path=[str(site)]):
        name = dist.metadata["Name"] if dist.metadata else None
        if name and canonicalize_name(name) in image:
            found.append(canonicalize_name(name))
    return sorted(set(found))


def _image_distributions() -> list[importlib.metadata.Distribution]:
    return list(importlib.metadata.distributions())
