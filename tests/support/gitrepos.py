"""Small local git repositories standing in for ComfyUI and custom node origins."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from runflow_worker.cache.environments import Environments
from runflow_worker.cache.git import GitMirrors

_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
             "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` and return its stdout (raises on failure)."""
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                         text=True, env={**os.environ, **_IDENTITY}, timeout=60)
    return out.stdout.strip()


def make_repo(path: Path) -> Path:
    """A repository with a ``main`` branch and no commit (in ``path``, which may exist)."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "--quiet", "--initial-branch", "main")
    return path


def commit(repo: Path, files: dict[str, str], message: str = "change") -> str:
    """Write ``files`` (relative path -> text), commit them, return the commit id."""
    for rel, text in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


COMFY = "https://git.example/comfyanonymous/ComfyUI"
"""The origin URL standing for ComfyUI's (mapped to a local repository)."""
NODE = "https://git.example/acme/ComfyUI-Foo"
"""The origin URL standing for a custom node pack's."""


class Origins:
    """Two local repositories standing in for ComfyUI and a custom node (``COMFY``,
    ``NODE``): ComfyUI at two commits, the node at one requiring ``tinydep`` (a local wheel
    in ``wheels``) and pytest (which the image has)."""

    def __init__(self, root: Path) -> None:
        self.comfy = make_repo(root / "origins" / "ComfyUI")
        self.comfy_v1 = commit(self.comfy, {"main.py": "VERSION = 1\n",
                                            "custom_nodes/example_node.py.example": "#\n"})
        self.comfy_v2 = commit(self.comfy, {"main.py": "VERSION = 2\n"})
        self.node = make_repo(root / "origins" / "ComfyUI-Foo")
        self.node_v1 = commit(self.node, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                          "requirements.txt": "tinydep==1.0\npytest\n"})
        self.wheels = root / "wheels"
        make_wheel(self.wheels, "tinydep", "1.0", "VALUE = 'from the environment'\n")

    def mirrors(self, root: Path) -> GitMirrors:
        """Git mirrors under ``root/cache/git`` mapping both origins to these repositories."""
        return GitMirrors(root / "cache" / "git", {COMFY: self.comfy, NODE: self.node})

    def environments(self, root: Path, **kwargs: object) -> Environments:
        """Environments under ``root/cache/envs`` installing from ``wheels`` only."""
        return Environments(root / "cache" / "envs", self.mirrors(root),
                            pip_index_url=None, pip_find_links=(str(self.wheels),),
                            **kwargs)  # type: ignore[arg-type]


PACK_COMFY = COMFY
PACK_GOOD = "https://git.example/acme/ComfyUI-Good"
PACK_BROKEN = "https://git.example/acme/ComfyUI-Broken"


def pack_origins(root: Path, broken_init: str) -> dict[str, Any]:
    """Local origins of a ComfyUI and two custom node packs, one that imports and one whose
    ``__init__.py`` is ``broken_init``: their commits, and origin URL -> repository."""
    comfy = make_repo(root / "ComfyUI")
    good = make_repo(root / "ComfyUI-Good")
    broken = make_repo(root / "ComfyUI-Broken")
    return {
        "comfy": commit(comfy, {"main.py": "1\n"}),
        "good": commit(good, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"}),
        "broken": commit(broken, {"__init__.py": broken_init}),
        "paths": {PACK_COMFY: comfy, PACK_GOOD: good, PACK_BROKEN: broken},
    }


def make_wheel(directory: Path, name: str, version: str, module_text: str) -> Path:
    """A minimal pure-Python wheel of module ``name`` (installable offline with pip)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_text,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n"),
    }
    record_lines = []
    for rel, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record_lines.append(f"{rel},sha256={digest.decode()},{len(text.encode())}")
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record_lines) + "\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
    return wheel
