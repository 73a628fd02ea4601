"""Whether a ComfyUI child would load custom nodes, told without importing anything.

The answer decides whether a warm child may serve runs of several owners
(``RunnerConfig.custom_code``, SPEC §9). It follows ComfyUI's own listing of a custom-node
directory (``nodes.init_external_custom_nodes`` at the pinned commit): every entry but
``__pycache__``, files not ending in ``.py`` and names ending in ``.disabled`` is imported.
ComfyUI ships ``websocket_image_save.py`` in its ``custom_nodes/``: that is ComfyUI's own
code, not a stranger's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

COMFYUI_OWN = frozenset({"websocket_image_save.py"})
"""Entries of a ComfyUI checkout's ``custom_nodes/`` that ComfyUI itself ships."""


def custom_node_entries(directory: Path) -> list[str]:
    """Names in ``directory`` that ComfyUI would import as custom nodes (sorted; none when
    the directory does not exist), ComfyUI's own files left out."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = directory / name
        if name == "__pycache__" or name.endswith(".disabled") or name in COMFYUI_OWN:
            continue
        if path.is_file() and path.suffix != ".py":
            continue
        found.append(name)
    return sorted(found)


def loads_custom_nodes(directories: Iterable[str | Path]) -> bool:
    """True when a child given these custom-node directories would import any custom node.

    A directory that cannot be listed (permissions) counts as holding custom nodes: a wrong
    "no" would let a stranger's code serve several owners.
    """
    for directory in directories:
        try:
            if custom_node_entries(Path(directory)):
                return True
        except OSError:
            return True
    return False
