"""SPEC section 4: injection of every input type, and the pure graph helpers."""

from __future__ import annotations

import copy

from runflow_worker.runtime.graph import derived_input_types, is_link, next_node_id, output_nodes
from runflow_worker.runtime.rewrite import inject_inputs

GRAPH = {
    "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "s"}},
    "2": {"class_type": "RunflowInputInt", "inputs": {"input_id": "i"}},
    "3": {"class_type": "RunflowInputFloat", "inputs": {"input_id": "f"}},
    "4": {"class_type": "RunflowInputBoolean", "inputs": {"input_id": "b"}},
    "5": {"class_type": "RunflowInputImage", "inputs": {"input_id": "img"}},
    "6": {"class_type": "RunflowInputImage", "inputs": {"input_id": "img"}},
    "7": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
    "8": {"class_type": "RunflowInputString", "inputs": {"input_id": "s"}},
    "9": {"class_type": "RunflowOutputImage",
          "inputs": {"output_id": "hero", "value": ["5", 0]}},
    "10": {"class_type": "SaveImage", "inputs": {"images": ["6", 0]}},
}


def test_every_type_injected_and_original_untouched() -> None:
    before = copy.deepcopy(GRAPH)
    out = inject_inputs(GRAPH, {"s": "otter", "i": 5, "f": 0.25, "b": False},
                        {"img": "runflow_inputs/img/img.png", "doc": "runflow_inputs/doc/a.txt"})
    assert GRAPH == before
    assert all(out[n] is not GRAPH[n] and out[n]["inputs"] is not GRAPH[n]["inputs"]
               for n in ("1", "2", "3", "4", "5", "6", "7", "8"))  # what injection writes
    assert out["1"]["inputs"]["value"] == "otter"
    assert out["8"]["inputs"]["value"] == "otter"  # same input_id, same type: both
    assert out["2"]["inputs"]["value"] == 5
    assert out["3"]["inputs"]["value"] == 0.25
    assert out["4"]["inputs"]["value"] is False
    assert out["7"]["inputs"]["value"] == "runflow_inputs/doc/a.txt"
    link5, link6 = out["5"]["inputs"]["value"], out["6"]["inputs"]["value"]
    assert is_link(link5) and link5 == link6  # one loader per input_id
    loader = out[link5[0]]
    assert loader["class_type"] == "LoadImage"
    assert loader["inputs"]["image"] == "runflow_inputs/img/img.png"
    assert link5[0] not in GRAPH and int(link5[0]) > 10
    assert out["5"]["inputs"]["input_id"] == "img"  # never renamed


def test_missing_values_leave_the_socket_unset() -> None:
    out = inject_inputs(GRAPH, {}, {})
    assert all("value" not in out[n]["inputs"] for n in ("1", "2", "5", "7"))
    assert len(out) == len(GRAPH)


def test_graph_helpers() -> None:
    assert derived_input_types(GRAPH)["img"] == "IMAGE"
    assert output_nodes(GRAPH) == {"9": "hero"}
    assert next_node_id({"1": {}, "abc": {}, "7": {}}) == "8"
    # ComfyUI's own rule: a string node id and a number.
    assert is_link(["3", 0]) and is_link(["3", 0.0]) and is_link(["a", True])
    assert not is_link([3, 0]) and not is_link([1, 2, 3]) and not is_link(["3", "0"])
