"""SPEC section 3: message parsing and every rule checkable before any GPU work."""

from __future__ import annotations

import json

import pytest

from runflow_worker.errors import ErrorCode, RunRejected
from runflow_worker.run.contract import (
    RunRecord,
    RunStatus,
    check_message,
    effective_inputs,
    parse_message,
    parse_message_json,
    resolved_values,
)
from tests.support.factories import SHA, message, workflow

ALL_TYPES_GRAPH = {
    "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "s"}},
    "2": {"class_type": "RunflowInputInt", "inputs": {"input_id": "i"}},
    "3": {"class_type": "RunflowInputFloat", "inputs": {"input_id": "f"}},
    "4": {"class_type": "RunflowInputBoolean", "inputs": {"input_id": "b"}},
    "5": {"class_type": "RunflowInputImage", "inputs": {"input_id": "img"}},
    "6": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0]}},
}
GOOD_INPUT = {"s": "x", "i": 3, "f": 0.5, "b": True,
              "img": "https://example.com/a.png", "doc": "runflow://assets/"
              "0b7e5a9e-3f0c-4c55-9c1e-1d1b1d1b1d1b"}


def reject(msg: dict, **kwargs) -> RunRejected:
    with pytest.raises(RunRejected) as info:
        check_message(parse_message(msg), **kwargs)
    return info.value


def test_valid_message_passes_and_defaults_fill_in() -> None:
    wf = workflow(ALL_TYPES_GRAPH, inputs=[{"input_id": "i", "type": "INT", "default": 7}])
    inp = dict(GOOD_INPUT)
    del inp["i"]
    m = parse_message(message(wf=wf, input=inp))
    defs = check_message(m)
    assert set(defs) == {"s", "i", "f", "b", "img", "doc"}
    assert resolved_values(m, defs)["i"] == 7
    assert defs["s"].required is True  # derived from the graph: no default, so required


def test_unpinned_custom_node_and_forbidden_origin() -> None:
    wf = workflow(custom_nodes={
        "ComfyUI-Foo": {"origin": "https://github.com/x/ComfyUI-Foo", "commit": "main"},
        "ComfyUI-Bar": {"origin": "git@github.com:x/Bar.git", "commit": "a" * 40},
        "ComfyUI-Baz": {"origin": "http://example.com/baz", "commit": "b" * 40, "dirty": True},
    })
    err = reject(message(wf=wf))
    assert err.code is ErrorCode.UNPINNED_CUSTOM_NODE
    fields = {v["field"]: v["code"] for v in err.details["violations"]}
    assert fields["workflow.custom_nodes.ComfyUI-Foo.commit"] == "UNPINNED_CUSTOM_NODE"
    assert fields["workflow.custom_nodes.ComfyUI-Bar.origin"] == "FORBIDDEN_ORIGIN"
    assert fields["workflow.custom_nodes.ComfyUI-Baz.origin"] == "FORBIDDEN_ORIGIN"


def test_operator_allowlist_admits_other_origins_and_dirty_never_blocks() -> None:
    wf = workflow(custom_nodes={
        "Internal": {"origin": "git@git.internal:nodes/x.git", "commit": "c" * 40,
                     "dirty": True}})
    check_message(parse_message(message(wf=wf)), allowed_origins=("git@git.internal:",))


def test_comfyui_itself_must_have_origin_and_commit() -> None:
    wf = workflow()
    wf["environment"]["comfyui"] = {"origin": None, "commit": None}
    err = reject(message(wf=wf))
    fields = {v["field"] for v in err.details["violations"]}
    assert {"workflow.environment.comfyui.commit",
            "workflow.environment.comfyui.origin"} <= fields


def test_model_without_valid_sha() -> None:
    wf = workflow(models={"checkpoints/a.safetensors": {"url": "https://h/a"},
                          "vae/b.safetensors": {"sha256": "xyz"},
                          "loras/ok.safetensors": {"sha256": SHA}})
    err = reject(message(wf=wf))
    assert err.code is ErrorCode.INVALID_SHA
    assert err.details["fields"] == ["workflow.models.checkpoints/a.safetensors.sha256",
                                     "workflow.models.vae/b.safetensors.sha256"]


def test_model_and_resource_keys_cannot_escape() -> None:
    wf = workflow(models={"../../etc/x.safetensors": {"sha256": SHA}},
                  resources={"/abs/mask.png": {"sha256": SHA}})
    err = reject(message(wf=wf))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert len(err.details["fields"]) == 2


@pytest.mark.parametrize(("key", "value", "why"), [
    ("i", "5", "integer"), ("i", 5.5, "integer"), ("i", True, "integer"),
    ("f", "0.5", "number"), ("b", 1, "boolean"), ("s", 3, "string"),
    ("img", "http://example.com/a.png", "http://"),
    ("img", "https://user:pw@example.com/a.png", "credentials"),
    ("img", "ftp://example.com/a.png", "https://"),
    ("doc", "file:///etc/passwd", "https://"),
    ("doc", 12, "URL"),
])
def test_wrong_input_values(key: str, value: object, why: str) -> None:
    err = reject(message(ALL_TYPES_GRAPH, input={**GOOD_INPUT, key: value}))
    assert err.code is ErrorCode.INVALID_INPUT
    assert err.details["fields"] == [f"input.{key}"]
    assert why in err.message


def test_unknown_and_missing_inputs_name_every_key() -> None:
    inp = {k: v for k, v in GOOD_INPUT.items() if k not in ("s", "f")}
    inp.update({"nope": 1, "other": 2})
    err = reject(message(ALL_TYPES_GRAPH, input=inp))
    assert err.code is ErrorCode.INVALID_INPUT
    assert err.details["fields"] == ["input.f", "input.nope", "input.other", "input.s"]


def test_local_files_only_when_allowed() -> None:
    inp = {**GOOD_INPUT, "doc": "file:///tmp/x.txt"}
    reject(message(ALL_TYPES_GRAPH, input=inp))
    check_message(parse_message(message(ALL_TYPES_GRAPH, input=inp)), allow_local_files=True)


@pytest.mark.parametrize("graph", [[], "x", {}, {"1": "node"}, {"1": {"inputs": {}}}])
def test_graph_not_a_dict_of_nodes(graph: object) -> None:
    err = reject(message(wf=workflow(graph), input={}))
    assert err.code is ErrorCode.INVALID_WORKFLOW


def test_link_to_missing_node() -> None:
    graph = {"1": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}}}
    err = reject(message(graph, input={}))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert err.details["fields"] == ["workflow.workflow_json.1.inputs.images"]


def test_input_id_shared_with_different_types() -> None:
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "x"}},
             "2": {"class_type": "RunflowInputInt", "inputs": {"input_id": "x"}},
             "3": {"class_type": "RunflowInputInt", "inputs": {"input_id": "y"}},
             "4": {"class_type": "RunflowInputInt", "inputs": {"input_id": "y"}}}
    err = reject(message(graph, input={"x": "a", "y": 1}))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert "x" in err.message and "different types" in err.message


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secret.png", "a/../../b.png",
                                  "out.png [output]", "t.png [temp]", "C:\\x.png"])
def test_file_references_that_escape(name: str) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    err = reject(message(graph, input={}))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert err.details["fields"] == ["workflow.workflow_json.1.inputs.image"]


def test_declared_type_must_match_graph_and_defaults_must_be_valid() -> None:
    wf = workflow(inputs=[{"input_id": "prompt", "type": "INT", "default": "x"}])
    err = reject(message(wf=wf, input={"prompt": 1}))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert len(err.details["violations"]) == 2


def test_several_rules_broken_reports_all_and_picks_the_first_code() -> None:
    wf = workflow(models={"checkpoints/a.safetensors": {"sha256": "bad"}},
                  custom_nodes={"X": {"origin": "https://h/x", "commit": "nope"}})
    err = reject(message(wf=wf, input={"unknown": 1}))
    assert err.code is ErrorCode.UNPINNED_CUSTOM_NODE
    codes = {v["code"] for v in err.details["violations"]}
    assert codes == {"UNPINNED_CUSTOM_NODE", "INVALID_SHA", "INVALID_INPUT"}


def test_shape_errors_name_fields() -> None:
    with pytest.raises(RunRejected) as info:
        parse_message({"workflow": {"workflow_json": {}}, "attempt": 0})
    fields = set(info.value.details["fields"]) | {
        v["field"] for v in info.value.details["violations"]}
    assert "run_id" in fields and "attempt" in fields
    with pytest.raises(RunRejected):
        parse_message_json(b"{not json")


def test_bad_run_id_and_callback() -> None:
    err = reject(message(run_id="../x", callback_url="http://example.com/hook"))
    fields = {v["field"] for v in err.details["violations"]}
    assert fields == {"run_id", "callback_url"}


def test_effective_inputs_are_the_graphs_completed_by_declarations() -> None:
    wf = parse_message(message(wf=workflow(inputs=[
        {"input_id": "prompt", "type": "STRING", "default": "d"},
        {"input_id": "gone", "type": "IMAGE", "required": True}]))).workflow
    defs, problems = effective_inputs(wf)
    assert problems == []
    assert defs["prompt"].default == "d"
    # A declaration whose node is not in the graph declares nothing: it is not required,
    # and a caller value for it is refused as undeclared.
    assert "gone" not in defs
    err = reject(message(wf=workflow(inputs=[{"input_id": "gone", "type": "STRING"}]),
                         input={"prompt": "x", "gone": "y"}))
    assert err.code is ErrorCode.INVALID_INPUT
    assert [v["field"] for v in err.details["violations"]] == ["input.gone"]


def test_json_types_only_no_coercion_and_finite_numbers() -> None:
    graph = dict(ALL_TYPES_GRAPH)
    for value in (float("nan"), float("inf"), float("-inf")):
        err = reject(message(wf=workflow(graph), input={**GOOD_INPUT, "f": value}))
        assert [v["field"] for v in err.details["violations"]] == ["input.f"]
    err = reject(message(wf=workflow(graph, inputs=[
        {"input_id": "f", "type": "FLOAT", "default": float("nan")}]), input=GOOD_INPUT))
    assert [v["field"] for v in err.details["violations"]] == ["workflow.inputs[0].default"]
    # NaN / Infinity in the JSON text itself (not JSON, though Python's parser takes them).
    raw = parse_message_json(json.dumps(message(wf=workflow(graph), input=GOOD_INPUT)))
    assert raw.timeout_s == 1800.0
    text = json.dumps(message(wf=workflow(graph), input={**GOOD_INPUT, "f": 1.5}))
    with pytest.raises(RunRejected) as info:
        check_message(parse_message_json(text.replace("1.5", "NaN")))
    assert info.value.details["violations"][0]["field"] == "input.f"
    for bad in ({"attempt": "2"}, {"timeout_s": True}, {"timeout_s": float("inf")},
                {"timeout_s": "60"}):
        with pytest.raises(RunRejected) as info:
            parse_message({**message(), **bad})
        assert info.value.details["violations"][0]["field"] == next(iter(bad))
    with pytest.raises(RunRejected):
        parse_message(message(wf=workflow(inputs=[
            {"input_id": "prompt", "type": "STRING", "required": "yes"}])))
    assert parse_message({**message(), "timeout_s": None}).timeout_s == 1800.0


def test_values_with_a_trailing_newline_are_refused() -> None:
    wf = workflow(models={"checkpoints/a.safetensors": {"sha256": SHA + "\n"}},
                  custom_nodes={"N": {"origin": "https://github.com/x/N", "commit": "a" * 40 + "\n"}})
    err = reject(message(wf=wf, run_id="run-1\n", input={"prompt": "x"}))
    fields = {v["field"]: v["code"] for v in err.details["violations"]}
    assert fields == {"run_id": "INVALID_INPUT",
                      "workflow.custom_nodes.N.commit": "UNPINNED_CUSTOM_NODE",
                      "workflow.models.checkpoints/a.safetensors.sha256": "INVALID_SHA"}


def test_mistyped_pins_get_their_rule_codes_and_every_violation_is_named() -> None:
    wf = workflow(models={"a.safetensors": {"sha256": 123}},
                  custom_nodes={"N": {"origin": ["x"], "commit": 1234}})
    err = reject(message(wf=wf, input={"prompt": 5, "zzz": 1}))
    fields = {v["field"]: v["code"] for v in err.details["violations"]}
    assert fields == {"workflow.models.a.safetensors.sha256": "INVALID_SHA",
                      "workflow.custom_nodes.N.commit": "UNPINNED_CUSTOM_NODE",
                      "workflow.custom_nodes.N.origin": "FORBIDDEN_ORIGIN",
                      "input.prompt": "INVALID_INPUT", "input.zzz": "INVALID_INPUT"}


def test_model_and_resource_keys_name_files_outside_the_callers_folder() -> None:
    for key in (".", "a/.", "checkpoints/", "a//b"):
        err = reject(message(wf=workflow(models={key: {"sha256": SHA}})))
        assert err.details["violations"][0]["field"] == f"workflow.models.{key}"
    err = reject(message(wf=workflow(resources={
        "runflow_inputs/doc/m.safetensors": {"sha256": SHA, "url": "https://h/m"}})))
    (violation,) = err.details["violations"]
    assert violation["code"] == "INVALID_WORKFLOW" and "callers" in violation["message"]
    check_message(parse_message(message(wf=workflow(resources={
        "masks/runflow_inputs.png": {"sha256": SHA, "url": "https://h/m.png"}}))))


@pytest.mark.parametrize("node", [
    {"class_type": ["RunflowInputString"], "inputs": {"input_id": "x"}},
    {"class_type": {"a": 1}, "inputs": {}},
    {"class_type": "RunflowInputString", "inputs": ["input_id", "x"]},
    {"class_type": "RunflowInputImage", "inputs": "x"},
    {"class_type": "RunflowOutputImage", "inputs": ["output_id"]},
])
def test_malformed_nodes_are_invalid_workflow_not_a_crash(node: dict) -> None:
    err = reject(message({**workflow()["workflow_json"], "9": node}))
    assert err.code is ErrorCode.INVALID_WORKFLOW
    assert all(v["field"].startswith("workflow.workflow_json.9") for v in
               err.details["violations"])


@pytest.mark.parametrize("output_id", ["../victim-run/hero", "a/b", "..", "a\\b", ["1", 0],
                                       "x" * 129, "tab\there"])
def test_output_ids_are_one_path_segment(output_id: object) -> None:
    graph = {**workflow()["workflow_json"],
             "3": {"class_type": "RunflowOutputImage", "inputs": {"images": ["1", 0],
                                                                  "output_id": output_id}}}
    err = reject(message(graph))
    assert [v["field"] for v in err.details["violations"]] == [
        "workflow.workflow_json.3.inputs.output_id"]


def test_links_by_comfyuis_rule_must_reach_a_node() -> None:
    graph = {**workflow()["workflow_json"],
             "3": {"class_type": "SaveImage", "inputs": {"images": ["99", 0.0],
                                                         "size": [3, 0]}}}
    err = reject(message(graph))
    assert [v["field"] for v in err.details["violations"]] == [
        "workflow.workflow_json.3.inputs.images"]


def test_node_ids_are_one_path_segment() -> None:
    graph = {**workflow()["workflow_json"],
             "../x": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    err = reject(message(graph))
    assert [v["field"] for v in err.details["violations"]] == ["workflow.workflow_json.../x"]


def test_record_round_trip() -> None:
    rec = RunRecord(id="r", status=RunStatus.SUCCEEDED, timings_ms={"execute": 3})
    again = RunRecord.model_validate_json(rec.to_json())
    assert again.status.terminal and again.timings_ms == {"execute": 3}

