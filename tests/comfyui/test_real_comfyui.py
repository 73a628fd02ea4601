"""Real ComfyUI, embedded in the spawned child, through the whole run pipeline."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus
from tests.comfyui.scenario import img_graph, run, seed_blob, write_png
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import url_path
from tests.support.paths import REPO

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]


def test_image_graph_fed_by_every_input_type(pipeline, tmp_path: Path) -> None:
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "2": {"class_type": "RunflowInputInt", "inputs": {"input_id": "width"}},
        "3": {"class_type": "RunflowInputInt", "inputs": {"input_id": "height"}},
        "4": {"class_type": "RunflowInputFloat", "inputs": {"input_id": "noise"}},
        "5": {"class_type": "RunflowInputBoolean", "inputs": {"input_id": "match"}},
        "6": {"class_type": "RunflowInputString", "inputs": {"input_id": "caption"}},
        "7": {"class_type": "RunflowInputFile", "inputs": {"input_id": "notes"}},
        "10": {"class_type": "ImageScale", "inputs": {
            "image": ["1", 0], "upscale_method": "nearest-exact", "width": ["2", 0],
            "height": ["3", 0], "crop": "disabled"}},
        "11": {"class_type": "ImageAddNoise", "inputs": {
            "image": ["10", 0], "seed": 3, "strength": ["4", 0]}},
        "12": {"class_type": "ImageStitch", "inputs": {
            "image1": ["11", 0], "image2": ["10", 0], "direction": "right",
            "match_image_size": ["5", 0], "spacing_width": 0, "spacing_color": "white"}},
        "13": {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 2}},
        "14": {"class_type": "RunflowTestWriteText", "inputs": {"text": ["6", 0],
                                                                "file": ["7", 0]}},
        "20": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "stitched", "output_name": "", "value": ["12", 0]}},
        "21": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "batch", "output_name": "", "value": ["13", 0]}},
        "22": {"class_type": "RunflowOutputFile", "inputs": {
            "output_id": "note", "output_name": "", "value": ["14", 0]}},
        "30": {"class_type": "SaveImage", "inputs": {"images": ["10", 0],
                                                     "filename_prefix": "ignored"}},
    }
    image = write_png(tmp_path / "in.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("file body")
    result = run(pipeline, graph, {
        "image": image.as_uri(), "width": 40, "height": 30, "noise": 0.2, "match": True,
        "caption": "a sea otter", "notes": notes.as_uri()}, run_id="every-type")
    assert result.status is RunStatus.SUCCEEDED, result.failure
    by_id: dict[str, list] = {}
    for entry in result.output.outputs:
        by_id.setdefault(entry.output_id, []).append(entry)
    assert sorted(by_id) == ["batch", "note", "stitched"]  # SaveImage is not a Runflow output
    (stitched,) = by_id["stitched"]
    assert Image.open(url_path(stitched.url)).size == (80, 30)
    assert len(by_id["batch"]) == 2 and all(e.content_type == "image/png" for e in by_id["batch"])
    (note,) = by_id["note"]
    assert url_path(note.url).read_text() == "a sea otter\nfile body"
    assert note.key == "runs/every-type/note/note.txt"


def test_outputs_are_fresh_on_every_run(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                       "3": {"class_type": "RunflowOutputImage", "inputs": {
                           "output_id": "inv", "output_name": "", "value": ["2", 0]}}})
    red = write_png(tmp_path / "a.png", color=(255, 0, 0))
    first = run(pipeline, graph, {"image": red.as_uri()}, run_id="fresh-1")
    again = run(pipeline, graph, {"image": red.as_uri()}, run_id="fresh-2")
    blue = write_png(tmp_path / "a.png", color=(0, 0, 255))  # same name, new content
    third = run(pipeline, graph, {"image": blue.as_uri()}, run_id="fresh-3")
    for r in (first, again, third):
        assert r.status is RunStatus.SUCCEEDED, r.failure
        assert len(r.output.outputs) == 1
    px = [Image.open(url_path(r.output.outputs[0].url)).getpixel((0, 0))
          for r in (first, again, third)]
    assert px[0] == px[1] == (0, 255, 255) and px[2] == (255, 255, 0)
    assert url_path(again.output.outputs[0].url).exists()


def test_an_image_input_node_is_not_run_its_readers_read_the_loader(pipeline,
                                                                     tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                       "3": {"class_type": "RunflowOutputImage", "inputs": {
                           "output_id": "inv", "output_name": "", "value": ["2", 0]}},
                       "4": {"class_type": "RunflowOutputImage", "inputs": {
                           "output_id": "same", "output_name": "", "value": ["1", 0]}}})
    control = RecordingControl()
    result = run(pipeline, graph, {"image": write_png(tmp_path / "g.png",
                                                      color=(0, 255, 0)).as_uri()},
                 run_id="pass-through", control=control)
    assert result.status is RunStatus.SUCCEEDED, result.failure
    started = [d["node_type"] for kind, d in control.events
               if kind == "progress" and d.get("phase") == "execute" and "node_type" in d]
    # The loader the worker added ran, the pass-through input node did not.
    assert sorted(started) == ["ImageInvert", "LoadImage", "RunflowOutputImage",
                               "RunflowOutputImage"]
    px = {e.output_id: Image.open(url_path(e.url)).getpixel((0, 0))
          for e in result.output.outputs}
    assert px == {"inv": (255, 0, 255), "same": (0, 255, 0)}


def test_a_callers_file_never_reaches_the_next_run_through_the_cache(pipeline,
                                                                     tmp_path: Path) -> None:
    # The same graph and caption, and files of one name with other bytes: the node reading
    # the file must run again rather than hand the second caller the first one's result.
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "caption"}},
             "2": {"class_type": "RunflowInputFile", "inputs": {"input_id": "notes"}},
             "3": {"class_type": "RunflowTestWriteText", "inputs": {"text": ["1", 0],
                                                                    "file": ["2", 0]}},
             "4": {"class_type": "RunflowOutputFile", "inputs": {
                 "output_id": "note", "output_name": "", "value": ["3", 0]}}}
    texts = []
    for who in ("alice", "bob"):
        notes = tmp_path / who / "notes.txt"
        notes.parent.mkdir()
        notes.write_text(f"{who}'s private notes")
        result = run(pipeline, graph, {"caption": "same", "notes": notes.as_uri()},
                     run_id=f"cache-{who}")
        assert result.status is RunStatus.SUCCEEDED, result.failure
        texts.append(url_path(result.output.outputs[0].url).read_text())
    assert texts == ["same\nalice's private notes", "same\nbob's private notes"]


def test_a_resource_with_new_bytes_under_its_old_key_is_read_again(pipeline, comfy_env,
                                                                   tmp_path: Path) -> None:
    # Two deployments ship other bytes at one resource key; a node reads it by its path.
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "caption"}},
             "2": {"class_type": "RunflowInputString", "inputs": {"input_id": "path"}},
             "3": {"class_type": "RunflowTestWriteText", "inputs": {"text": ["1", 0],
                                                                    "file": ["2", 0]}},
             "4": {"class_type": "RunflowOutputFile", "inputs": {
                 "output_id": "note", "output_name": "", "value": ["3", 0]}}}
    texts = []
    for version in ("one", "two"):
        body = tmp_path / version / "readme.txt"
        body.parent.mkdir()
        body.write_text(f"resource {version}")
        digest = seed_blob(comfy_env["cache"] / "blobs", body)
        result = run(pipeline, graph, {"caption": "same", "path": "docs/readme.txt"},
                     run_id=f"resource-{version}",
                     resources={"docs/readme.txt": {"sha256": digest}})
        assert result.status is RunStatus.SUCCEEDED, result.failure
        texts.append(url_path(result.output.outputs[0].url).read_text())
    assert texts == ["same\nresource one", "same\nresource two"]


def test_no_runflow_output_falls_back_to_output_nodes(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"9": {"class_type": "SaveImage", "inputs": {
        "images": ["1", 0], "filename_prefix": "plain"}}})
    result = run(pipeline, graph, {"image": write_png(tmp_path / "x.png").as_uri()},
                 run_id="fallback")
    assert result.status is RunStatus.SUCCEEDED, result.failure
    (entry,) = result.output.outputs
    assert entry.output_id == "9" and entry.filename.startswith("plain_")


def test_spandrel_upscaler_from_the_store(pipeline, comfy_env, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_weights", REPO / "examples" / "upscale-x2" / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = module.write_weights(tmp_path / "compact.safetensors")
    digest = seed_blob(comfy_env["cache"] / "blobs", weights)
    graph = img_graph({
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x2.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {
            "upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "big", "output_name": "", "value": ["3", 0]}}})
    result = run(pipeline, graph, {"image": write_png(tmp_path / "u.png").as_uri()},
                 run_id="upscale",
                 models={"upscale_models/x2.safetensors": {"sha256": digest}})
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert Image.open(url_path(result.output.outputs[0].url)).size == (128, 96)


def sd15_graph(steps_input: bool = False) -> dict:
    return {
        "1": {"class_type": "RunflowInputInt", "inputs": {"input_id": "seed"}},
        "2": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
        "3": {"class_type": "RunflowInputInt", "inputs": {"input_id": "steps"}},
        "10": {"class_type": "UNETLoader", "inputs": {
            "unet_name": "tiny_sd15_unet.safetensors", "weight_dtype": "default"}},
        "11": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": "rand_clip_l.safetensors", "type": "stable_diffusion",
            "device": "default"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 0], "clip": ["11", 0]}},
        "14": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
        "15": {"class_type": "EmptyLatentImage", "inputs": {
            "width": 64, "height": 64, "batch_size": 1}},
        "16": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": ["1", 0], "steps": ["3", 0], "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["13", 0],
            "negative": ["14", 0], "latent_image": ["15", 0], "denoise": 1.0}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["12", 0]}},
        "18": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "image", "output_name": "", "value": ["17", 0]}},
    }


@pytest.fixture(scope="module")
def sd15_models_entry(sd15_models: Path, comfy_env) -> dict:
    models = {}
    for path in sorted(sd15_models.rglob("*.safetensors")):
        key = path.relative_to(sd15_models).as_posix()
        models[key] = {"sha256": seed_blob(comfy_env["cache"] / "blobs", path)}
    return models


def test_tiny_sd15_seed_determinism(pipeline, sd15_models_entry) -> None:
    def gen(seed: int, run_id: str) -> bytes:
        result = run(pipeline, sd15_graph(), {"seed": seed, "prompt": "an otter", "steps": 3},
                     run_id=run_id, models=sd15_models_entry)
        assert result.status is RunStatus.SUCCEEDED, result.failure
        (entry,) = result.output.outputs
        assert Image.open(url_path(entry.url)).size == (64, 64)
        return url_path(entry.url).read_bytes()

    a, b, c = gen(1, "sd-a"), gen(1, "sd-b"), gen(2, "sd-c")
    assert a == b
    assert a != c


def test_interrupt_mid_sampler(pipeline, sd15_models_entry) -> None:
    control = RecordingControl(cancel_when=lambda d: d.get("step", 0) >= 2)
    result = run(pipeline, sd15_graph(), {"seed": 5, "prompt": "x", "steps": 400},
                 run_id="sd-cancel", control=control, models=sd15_models_entry)
    ended = time.monotonic()
    assert result.status is RunStatus.CANCELED, result.failure
    assert control.canceled_at is not None and ended - control.canceled_at < 2.0
    steps = [d["step"] for _, d in control.events if "step" in d]
    assert max(steps) < 400


def test_node_exception(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "RunflowTestRaise", "inputs": {"image": ["1", 0]}},
                       "3": {"class_type": "RunflowOutputImage", "inputs": {
                           "output_id": "o", "output_name": "", "value": ["2", 0]}}})
    result = run(pipeline, graph, {"image": write_png(tmp_path / "e.png").as_uri()},
                 run_id="node-error")
    f = result.failure
    assert f.code is ErrorCode.NODE_ERROR
    assert (f.node_id, f.node_type) == ("2", "RunflowTestRaise")
    assert f.details["exception_type"] == "ValueError" and "test node exploded" in f.message


def test_oom_raised_by_a_node(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "RunflowTestOOM", "inputs": {"image": ["1", 0]}},
                       "3": {"class_type": "RunflowOutputImage", "inputs": {
                           "output_id": "o", "output_name": "", "value": ["2", 0]}}})
    result = run(pipeline, graph, {"image": write_png(tmp_path / "m.png").as_uri()},
                 run_id="oom")
    assert result.failure.code is ErrorCode.OUT_OF_MEMORY and result.oom
    assert result.failure.node_id == "2" and "TIPS" not in result.failure.message


@pytest.mark.parametrize(("tail", "node_id", "node_type"), [
    ({"2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}}}, "2", "NoSuchNode"),
    ({"2": {"class_type": "ImageScale", "inputs": {
        "image": ["1", 0], "upscale_method": "bogus", "width": 8, "height": 8,
        "crop": "disabled"}},
      "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}},
     "2", "ImageScale"),
    ({"2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "../../x.pth"}},
      "3": {"class_type": "ImageUpscaleWithModel", "inputs": {
          "upscale_model": ["2", 0], "image": ["1", 0]}},
      "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}},
     "2", "UpscaleModelLoader"),
])
def test_invalid_workflow_names_the_node(pipeline, tmp_path: Path, tail, node_id,
                                         node_type) -> None:
    result = run(pipeline, img_graph(tail), {"image": write_png(tmp_path / "v.png").as_uri()},
                 run_id="invalid")
    f = result.failure
    assert f is not None and f.code is ErrorCode.INVALID_WORKFLOW, f
    assert (f.node_id, f.node_type) == (node_id, node_type)


def test_file_references_checked_where_a_file_is_read(pipeline, tmp_path: Path) -> None:
    """A caller's text that looks like a path passes where the node reads no file; the same
    text in a file input (a combo) is refused before ComfyUI sees it."""
    text = "../../etc/passwd [output]"
    graph = img_graph({
        "2": {"class_type": "RunflowInputString", "inputs": {"input_id": "caption"}},
        "3": {"class_type": "RunflowTestWriteText", "inputs": {"text": ["2", 0],
                                                                "file": ["6", 0]}},
        "4": {"class_type": "RunflowOutputFile", "inputs": {
            "output_id": "note", "output_name": "", "value": ["3", 0]}},
        "5": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "o", "output_name": "", "value": ["1", 0]}},
        "6": {"class_type": "RunflowInputFile", "inputs": {"input_id": "notes"}}})
    image = write_png(tmp_path / "t.png").as_uri()
    notes = tmp_path / "notes.txt"
    notes.write_text("body")
    ok = run(pipeline, graph, {"image": image, "caption": text, "notes": notes.as_uri()},
             run_id="path-like-text")
    assert ok.status is RunStatus.SUCCEEDED, ok.failure
    (note,) = [e for e in ok.output.outputs if e.output_id == "note"]
    assert url_path(note.url).read_text() == f"{text}\nbody"
    bad = img_graph({
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x.pth [output]"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {
            "upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}})
    f = run(pipeline, bad, {"image": image}, run_id="annotated-file").failure
    assert f is not None and f.code is ErrorCode.INVALID_WORKFLOW, f
    assert (f.node_id, f.node_type) == ("2", "UpscaleModelLoader")
    assert "file reference uses a ComfyUI [output]/[temp]/[input] annotation" in f.message


def test_child_killed_mid_run_then_a_good_run(pipeline, tmp_path: Path) -> None:
    runner_pid = []

    def kill_on_progress(data: dict) -> bool:
        if data.get("step") == 2 and not runner_pid:
            pid = pipeline.supervisor.runner.pid
            runner_pid.append(pid)
            os.kill(pid, signal.SIGKILL)
        return False

    graph = img_graph({"2": {"class_type": "RunflowTestSleep", "inputs": {
        "image": ["1", 0], "steps": 200}},
        "3": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "o", "output_name": "", "value": ["2", 0]}}})
    image = write_png(tmp_path / "k.png").as_uri()
    result = run(pipeline, graph, {"image": image}, run_id="killed",
                 control=RecordingControl(cancel_when=kill_on_progress))
    assert result.failure.code is ErrorCode.INTERNAL
    assert "SIGKILL" in result.failure.message
    graph["2"]["inputs"]["steps"] = 2
    ok = run(pipeline, graph, {"image": image}, run_id="after-kill")
    assert ok.status is RunStatus.SUCCEEDED, ok.failure
    assert pipeline.supervisor.runner.pid != runner_pid[0]


def test_segfault_in_a_node(pipeline, tmp_path: Path) -> None:
    graph = img_graph({"2": {"class_type": "RunflowTestCrash", "inputs": {"image": ["1", 0]}},
                       "3": {"class_type": "SaveImage", "inputs": {
                           "images": ["2", 0], "filename_prefix": "x"}}})
    result = run(pipeline, graph, {"image": write_png(tmp_path / "s.png").as_uri()},
                 run_id="segv")
    assert result.failure.code is ErrorCode.INTERNAL and "SIGSEGV" in result.failure.message


