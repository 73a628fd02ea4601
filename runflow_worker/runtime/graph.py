"""Pure analysis of an API-format ComfyUI graph: no ComfyUI import, plain dicts only.

Used before any GPU work (SPEC section 3 rules on the graph) and by the rewriter. Each
problem is returned as ``GraphProblem(field, message, node_id, node_type)`` so the caller
can attach its own error code.
"""

from __future__ import annotations

import ntpath
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INPUT_CLASS_TYPES: dict[str, str] = {
    "RunflowInputString": "STRING",
    "RunflowInputInt": "INT",
    "RunflowInputFloat": "FLOAT",
    "RunflowInputBoolean": "BOOLEAN",
    "RunflowInputImage": "IMAGE",
    "RunflowInputFile": "FILE",
}
"""Runflow Input node class -> the input type it declares."""

OUTPUT_CLASS_TYPES: dict[str, str] = {
    "RunflowOutputImage": "IMAGE",
    "RunflowOutputFile": "FILE",
}
"""Runflow Output node class -> the output type it names."""

INPUT_TYPES = frozenset(INPUT_CLASS_TYPES.values())

# Inputs of core nodes that name a file under input/ (checked before any GPU work; the
# runner re-checks every upload/combo input once the node classes are known).
KNOWN_FILE_INPUTS: dict[str, tuple[str, ...]] = {
    "LoadImage": ("image",),
    "LoadImageMask": ("image",),
    "LoadImageOutput": ("image",),
    "LoadAudio": ("audio",),
    "LoadVideo": ("file",),
    "Load3D": ("model_file",),
    "Load3DAnimation": ("model_file",),
}

_ANNOTATION = re.compile(r"\s*\[(output|temp|input)\]\s*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SEGMENT_CHARS = 128


@dataclass(frozen=True)
class GraphProblem:
    """One problem found in the graph."""

    field: str
    message: str
    node_id: str | None = None
    node_type: str | None = None


@dataclass(frozen=True)
class InputNode:
    """A Runflow Input node of the graph."""

    node_id: str
    input_id: str
    type: str


def is_link(value: Any) -> bool:
    """True when ComfyUI takes an input value for a link ``[node_id, output_index]``.

    Its rule exactly (``comfy_execution.graph_utils.is_link``): a string node id and a
    number (``["3", 0.0]`` is a link too, ``[3, 0]`` is a literal list).
    """
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def file_reference_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable file reference (relative, inside), else None."""
    if _ANNOTATION.search(value):
        return "uses a ComfyUI [output]/[temp]/[input] annotation"
    if value.startswith(("/", "\\")) or ntpath.splitdrive(value)[0] or posixpath.isabs(value):
        return "is an absolute path"
    parts = re.split(r"[\\/]+", value)
    if any(part == ".." for part in parts):
        return "climbs out with '..'"
    if "\x00" in value:
        return "contains a NUL byte"
    return None


def path_segment_problem(value: str, *, max_chars: int = MAX_SEGMENT_CHARS) -> str | None:
    """Why ``value`` cannot be one segment of a storage key or file path, else None.

    The one rule for path segments (the run message checks, the output keys and the storage
    keys all use it): not empty, not ``.`` or ``..``, no slash or backslash, no control
    character, at most ``max_chars`` characters (ids: ``MAX_SEGMENT_CHARS``; output file
    names pass 255, a file name's limit on most file systems).

    Output ids (and node ids, the default output labels) become a segment of the object
    key ``runs/<run_id>/<output_id>/<filename>``: one that holds a slash or is ``..`` would
    place a run's files among another run's.
    """
    if not value:
        return "is empty"
    if value in (".", ".."):
        return f"is {value!r}"
    if "/" in value or "\\" in value:
        return "contains a slash"
    if _CONTROL.search(value):
        return "contains a control character"
    if len(value) > max_chars:
        return f"is longer than {max_chars} characters"
    return None


def _class_and_inputs(node: Any) -> tuple[str | None, dict[str, Any]]:
    """A node's ``class_type`` (None unless a string) and ``inputs`` (empty unless a dict):
    the node-level helpers below must not trip over a malformed node, which
    ``structure_problems`` reports."""
    if not isinstance(node, dict):
        return None, {}
    class_type = node.get("class_type")
    inputs = node.get("inputs")
    return (class_type if isinstance(class_type, str) else None,
            inputs if isinstance(inputs, dict) else {})


def structure_problems(graph: Any) -> list[GraphProblem]:
    """Problems of shape: not a dict of nodes, bad nodes, links to missing nodes."""
    if not isinstance(graph, dict) or not graph:
        return [GraphProblem("workflow.workflow_json", "must be a non-empty object of nodes")]
    problems: list[GraphProblem] = []
    for node_id, node in graph.items():
        where = f"workflow.workflow_json.{node_id}"
        why = path_segment_problem(str(node_id))
        if why:
            problems.append(GraphProblem(where, f"node id {why}", str(node_id)))
        if not isinstance(node, dict):
            problems.append(GraphProblem(where, "node must be an object", node_id))
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            problems.append(GraphProblem(f"{where}.class_type", "missing class_type", node_id))
            continue
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append(
                GraphProblem(f"{where}.inputs", "inputs must be an object", node_id, class_type)
            )
            continue
        for name, value in inputs.items():
            if is_link(value) and str(value[0]) not in graph:
                problems.append(
                    GraphProblem(
                        f"{where}.inputs.{name}",
                        f"links to missing node {value[0]!r}",
                        node_id,
                        class_type,
                    )
                )
        for name in KNOWN_FILE_INPUTS.get(class_type, ()):
            value = inputs.get(name)
            if isinstance(value, str):
                why = file_reference_problem(value)
                if why:
                    problems.append(
                        GraphProblem(f"{where}.inputs.{name}", f"file reference {why}",
                                     node_id, class_type)
                    )
    return problems


def input_nodes(graph: dict[str, Any]) -> list[InputNode]:
    """Every Runflow Input node with its ``input_id`` (nodes without one are skipped)."""
    found: list[InputNode] = []
    for node_id, node in graph.items():
        class_type, inputs = _class_and_inputs(node)
        kind = INPUT_CLASS_TYPES.get(class_type or "")
        if kind is None:
            continue
        input_id = inputs.get("input_id")
        if isinstance(input_id, str) and input_id:
            found.append(InputNode(str(node_id), input_id, kind))
    return found


def input_node_problems(graph: dict[str, Any]) -> list[GraphProblem]:
    """Input nodes without an ``input_id``, one ``input_id`` declared with two types, and
    Runflow Output nodes whose ``output_id`` is not a literal path segment."""
    problems: list[GraphProblem] = []
    for node_id, node in graph.items():
        class_type, inputs = _class_and_inputs(node)
        if class_type in INPUT_CLASS_TYPES:
            input_id = inputs.get("input_id")
            if not isinstance(input_id, str) or not input_id:
                problems.append(
                    GraphProblem(f"workflow.workflow_json.{node_id}.inputs.input_id",
                                 "Runflow Input node without an input_id",
                                 str(node_id), class_type)
                )
        elif class_type in OUTPUT_CLASS_TYPES and "output_id" in inputs:
            output_id = inputs["output_id"]
            why = ("must be a string, not a link" if not isinstance(output_id, str)
                   else path_segment_problem(output_id) if output_id else None)
            if why:
                problems.append(
                    GraphProblem(f"workflow.workflow_json.{node_id}.inputs.output_id",
                                 f"output_id {why}", str(node_id), class_type))
    types: dict[str, dict[str, list[str]]] = {}
    for node in input_nodes(graph):
        types.setdefault(node.input_id, {}).setdefault(node.type, []).append(node.node_id)
    for input_id, by_type in types.items():
        if len(by_type) > 1:
            detail = ", ".join(f"{t} (nodes {', '.join(ids)})" for t, ids in sorted(by_type.items()))
            problems.append(
                GraphProblem(f"workflow.workflow_json[input_id={input_id}]",
                             f"input_id {input_id!r} declared with different types: {detail}")
            )
    return problems


def derived_input_types(graph: dict[str, Any]) -> dict[str, str]:
    """``input_id -> type`` from the graph's Runflow Input nodes (first type wins)."""
    out: dict[str, str] = {}
    for node in input_nodes(graph):
        out.setdefault(node.input_id, node.type)
    return out


def output_nodes(graph: dict[str, Any]) -> dict[str, str]:
    """``node_id -> output_id`` of the Runflow Output nodes (default: the node id)."""
    out: dict[str, str] = {}
    for node_id, node in graph.items():
        class_type, inputs = _class_and_inputs(node)
        if class_type in OUTPUT_CLASS_TYPES:
            output_id = inputs.get("output_id")
            out[str(node_id)] = output_id if isinstance(output_id, str) and output_id else str(
                node_id
            )
    return out


def next_node_id(graph: dict[str, Any], taken: set[str] | None = None) -> str:
    """A fresh numeric node id, larger than every numeric id of the graph."""
    used = set(graph) | (taken or set())
    numeric = [int(k) for k in used if str(k).isdigit()]
    candidate = max(numeric, default=0) + 1
    while str(candidate) in used:
        candidate += 1
    return str(candidate)


def skip_pass_through_inputs(graph: dict[str, Any],
                             passes_through: Callable[[str], bool]) -> list[str]:
    """Take out of ``graph`` the Runflow Input nodes that only hand on a linked ``value``:
    whatever read such a node's output reads the node's source instead. Only classes
    ``passes_through`` names (the worker's own nodes, not an environment's own class of
    that name) are taken; a node read at another output than its one, or whose sources
    loop, stays for ComfyUI's validation to judge. ``graph`` changes in place, its nodes
    do not (a rewired node is a new dict). Returns the ids taken out.

    Why: ComfyUI runs every node it is given, a pass-through too (its caches, its events,
    a progress message of the run's): an image input cost a node more than the same graph
    with a loader where the input node stands.
    """
    sources: dict[str, list[Any]] = {}
    for node_id, node in graph.items():
        class_type, inputs = _class_and_inputs(node)
        value = inputs.get("value")
        if (class_type in INPUT_CLASS_TYPES and passes_through(class_type)
                and is_link(value) and value[0] in graph):
            sources[node_id] = value
    if not sources:
        return []
    links = [(node_id, name, value) for node_id, node in graph.items()
             for name, value in _class_and_inputs(node)[1].items() if is_link(value)]
    for _node_id, _name, value in links:
        if value[0] in sources and value[1] != 0:
            del sources[value[0]]  # read at an output it does not have: ComfyUI says so

    def origin(link: list[Any]) -> list[Any] | None:
        seen: set[str] = set()
        while link[0] in sources:
            if link[0] in seen:
                return None  # a loop of inputs: ComfyUI says so
            seen.add(link[0])
            link = sources[link[0]]
        return link

    for node_id in [n for n, source in sources.items() if origin(source) is None]:
        del sources[node_id]
    copied: set[str] = set()
    for node_id, name, value in links:
        source = origin(value) if value[0] in sources and node_id not in sources else None
        if source is not None:
            if node_id not in copied:
                node = graph[node_id]
                graph[node_id] = {**node, "inputs": {**node["inputs"]}}
                copied.add(node_id)
            graph[node_id]["inputs"][name] = [source[0], source[1]]
    for node_id in sources:
        del graph[node_id]
    return sorted(sources)
