"""The child takes the worker's own pass-through input nodes out of the graph it runs
(``runtime.graph.skip_pass_through_inputs``): their readers read the injected loader."""

from __future__ import annotations

import copy

import pytest

from runflow_worker.runtime.graph import INPUT_CLASS_TYPES, skip_pass_through_inputs
from runflow_worker.runtime.rewrite import inject_inputs

pytestmark = pytest.mark.timeout(30)


def ours(class_type: str) -> bool:
    return class_type in INPUT_CLASS_TYPES


DEPLOYED = {
    "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "RunflowOutputImage", "inputs": {"output_id": "r", "value": ["2", 0]}},
    "4": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
    "5": {"class_type": "ImageBlend", "inputs": {"image1": ["4", 0], "image2": ["1", 0.0]}},
    "6": {"class_type": "RunflowInputString", "inputs": {"input_id": "s"}},
    "7": {"class_type": "Note", "inputs": {"text": ["6", 0]}},
}


def test_readers_of_an_image_input_read_its_loader_and_the_nodes_stay_unchanged() -> None:
    graph = inject_inputs(DEPLOYED, {"s": "hello"}, {"image": "runflow_inputs/ab/image.png"})
    loader = next(k for k, n in graph.items() if n["class_type"] == "LoadImage")
    before = copy.deepcopy(graph)
    nodes = dict(graph)
    assert skip_pass_through_inputs(graph, ours) == ["1", "4"]
    assert "1" not in graph and "4" not in graph
    assert graph["2"]["inputs"]["image"] == [loader, 0]
    assert graph["5"]["inputs"] == {"image1": [loader, 0], "image2": [loader, 0]}
    # A literal value is no link: the string input stays, and so do its readers' links.
    assert graph["6"] == before["6"] and graph["7"] == before["7"]
    # Rewired nodes are new dicts: the job's own graph (sharing the old ones) is untouched.
    assert nodes["2"] == before["2"] and nodes["5"] == before["5"]


def test_an_environment_s_own_input_class_is_run_as_it_is() -> None:
    graph = inject_inputs(DEPLOYED, {"s": "x"}, {"image": "runflow_inputs/ab/image.png"})
    before = copy.deepcopy(graph)
    assert skip_pass_through_inputs(graph, lambda class_type: False) == []
    assert graph == before


def test_a_chain_of_inputs_reads_the_first_source() -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "RunflowInputImage", "inputs": {"input_id": "a", "value": ["1", 0]}},
        "3": {"class_type": "RunflowInputImage", "inputs": {"input_id": "b", "value": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }
    assert skip_pass_through_inputs(graph, ours) == ["2", "3"]
    assert graph["4"]["inputs"]["images"] == ["1", 0]


@pytest.mark.parametrize("graph", [
    {  # read at an output the node does not have
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "RunflowInputImage", "inputs": {"input_id": "a", "value": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1]}},
    },
    {  # inputs feeding each other
        "2": {"class_type": "RunflowInputImage", "inputs": {"input_id": "a", "value": ["3", 0]}},
        "3": {"class_type": "RunflowInputImage", "inputs": {"input_id": "b", "value": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    },
    {  # a value linked to a node that is not there
        "2": {"class_type": "RunflowInputImage", "inputs": {"input_id": "a", "value": ["9", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
    },
], ids=["other-output", "loop", "missing-source"])
def test_what_comfyui_must_judge_is_left_to_it(graph: dict) -> None:
    before = copy.deepcopy(graph)
    assert skip_pass_through_inputs(graph, ours) == []
    assert graph == before


def test_the_child_skips_only_classes_registered_as_its_own() -> None:
    from types import SimpleNamespace

    from runflow_worker.runtime import nodepack
    from runflow_worker.runtime.comfy import ComfyEmbedding

    class TheirInputImage:  # an environment's own class under the same name
        pass

    def embedding(mappings: dict) -> SimpleNamespace:
        return SimpleNamespace(_nodes=SimpleNamespace(NODE_CLASS_MAPPINGS=mappings))

    ours_registered = embedding(dict(nodepack.NODE_CLASS_MAPPINGS))
    theirs_registered = embedding({**nodepack.NODE_CLASS_MAPPINGS,
                                   "RunflowInputImage": TheirInputImage})
    own = ComfyEmbedding._own_input_class
    assert own(ours_registered, "RunflowInputImage")
    assert not own(theirs_registered, "RunflowInputImage")
    assert own(theirs_registered, "RunflowInputString")
    assert not own(ours_registered, "LoadImage")
