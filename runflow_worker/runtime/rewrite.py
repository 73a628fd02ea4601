"""Input injection (SPEC section 4): caller values into the graph's Runflow Input nodes.

Pure dict manipulation, no ComfyUI import. The input graph is never modified: the result
is a deep copy (ComfyUI also writes into the graph it executes).
"""

from __future__ import annotations

import copy
from typing import Any

from runflow_worker.runtime.graph import input_nodes, next_node_id

LITERAL_TYPES = frozenset({"STRING", "INT", "FLOAT", "BOOLEAN"})
IMAGE_LOADER_CLASS = "LoadImage"


def inject_inputs(
    graph: dict[str, Any],
    values: dict[str, Any],
    files: dict[str, str],
) -> dict[str, Any]:
    """Return a copy of ``graph`` with every Runflow Input node's ``value`` set.

    ``values`` maps ``input_id`` to literals (STRING/INT/FLOAT/BOOLEAN); ``files`` maps the
    ``input_id`` of IMAGE and FILE inputs to a filename relative to the run's input
    directory. IMAGE inputs get one ``LoadImage`` node per ``input_id`` wired to ``value``;
    FILE inputs get the filename itself. Inputs with neither are left unset (the node's
    ``value`` socket is optional). ``input_id``s are never renamed.
    """
    out = copy.deepcopy(graph)
    loaders: dict[str, str] = {}
    for node in input_nodes(out):
        inputs = out[node.node_id].setdefault("inputs", {})
        if node.type in LITERAL_TYPES:
            if node.input_id in values:
                inputs["value"] = values[node.input_id]
        elif node.type == "FILE":
            if node.input_id in files:
                inputs["value"] = files[node.input_id]
        elif node.type == "IMAGE" and node.input_id in files:
            loader_id = loaders.get(node.input_id)
            if loader_id is None:
                loader_id = next_node_id(out)
                out[loader_id] = {
                    "class_type": IMAGE_LOADER_CLASS,
                    "inputs": {"image": files[node.input_id]},
                    "_meta": {"title": f"Runflow input {node.input_id}"},
                }
                loaders[node.input_id] = loader_id
            inputs["value"] = [loader_id, 0]
    return out
