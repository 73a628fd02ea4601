"""ComfyUI's built-in extra nodes loaded when a graph names them (``runtime.builtinnodes``),
with real ComfyUI: the same registry and the same outcomes as with everything loaded at
start, which is what a child with custom nodes (and ComfyUI itself) does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.runner import Runner, RunnerConfig
from tests.comfyui.scenario import COMFY, HERE
from tests.support.paths import REPO as ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]


def registry(tmp_path: Path, mode: str, names: list[str] | None = None,
             seed: int = 0) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "builtin_registry.py"), COMFY, str(tmp_path / mode), mode,
         str(seed)], input=json.dumps(names or []), capture_output=True, text=True,
        timeout=600, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_deferred_registry_is_comfyuis(tmp_path: Path) -> None:
    eager = registry(tmp_path, "eager")
    assert len(eager["classes"]) > 300
    deferred = registry(tmp_path, "deferred", list(eager["classes"]), seed=11)
    assert deferred["pending_at_start"] > 50  # the built-in files were deferred
    # Every name ComfyUI registers resolves to ComfyUI's class, found by its spelling in
    # its file alone (never a load of everything); every file spells its names out.
    assert deferred["full_loads"] == 0
    assert deferred["unspelled"] == {}
    assert deferred["settled"]["classes"] == eager["classes"]
    assert deferred["classes"] == eager["classes"]
    assert deferred["display_names"] == eager["display_names"]


def job(job_id: str, graph: dict[str, Any], tmp_path: Path) -> p.Execute:
    dirs = [tmp_path / job_id.replace(":", "-") / d for d in ("in", "out", "tmp")]
    for d in dirs:
        d.mkdir(parents=True)
    Image.new("RGB", (16, 12), (10, 200, 30)).save(dirs[0] / "in.png")
    return p.Execute(job_id, graph, *(str(d) for d in dirs))


def same(outcome: Any) -> Any:
    """What must match between the eager and the deferred child (no timings)."""
    if isinstance(outcome, p.Done):
        return ("done", [(f.node_id, f.node_type, f.relpath, f.output_id)
                         for f in outcome.outputs])
    assert isinstance(outcome, p.Failed)
    return ("failed", outcome.kind, outcome.message, outcome.node_id, outcome.node_type,
            outcome.exception_type, outcome.details.get("type") if outcome.details else None,
            (outcome.details or {}).get("errors"))


GRAPHS: dict[str, dict[str, Any]] = {  # run in this order: each may load more
    # built-in extra nodes (comfy_extras/nodes_post_processing.py, nodes_images.py)
    "extras": {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
               "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0],
                                                           "blur_radius": 2, "sigma": 1.0}},
               "3": {"class_type": "ImageStitch", "inputs": {
                   "image1": ["2", 0], "image2": ["1", 0], "direction": "right",
                   "match_image_size": True, "spacing_width": 0, "spacing_color": "white"}},
               "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                           "filename_prefix": "x"}}},
    # a deferred node's failures: an input out of range, a model that is not there
    "bad input": {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                  "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0],
                                                              "blur_radius": 99, "sigma": 1.0}},
                  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                              "filename_prefix": "x"}}},
    "no model": {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x.pth"}},
                 "2": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                 "3": {"class_type": "ImageUpscaleWithModel", "inputs": {
                     "upscale_model": ["1", 0], "image": ["2", 0]}},
                 "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                             "filename_prefix": "x"}}},
    # ComfyUI's own custom_nodes/websocket_image_save.py: an output node with no files
    "own custom node": {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                        "2": {"class_type": "SaveImageWebsocket",
                              "inputs": {"images": ["1", 0]}}},
    # ComfyUI's API nodes are not loaded, eager or deferred: the class does not exist
    "api node": {"1": {"class_type": "OpenAIDalle3", "inputs": {"prompt": "a cat"}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                             "filename_prefix": "x"}}},
    "unknown": {"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}},
    "core only": {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                  "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                              "filename_prefix": "x"}}},
}


def test_outcomes_match_a_child_that_loads_everything(tmp_path: Path) -> None:
    outcomes: dict[str, list[Any]] = {}
    node_counts: dict[str, int] = {}
    for entry in ("runflow_worker.runtime.child:main", "tests.comfyui.eager_child:main"):
        (tmp_path / entry / "base").mkdir(parents=True)
        runner = Runner(RunnerConfig(
            comfyui_dir=COMFY, base_dir=str(tmp_path / entry / "base"), cpu=True,
            custom_node_dirs=(os.path.join(COMFY, "custom_nodes"),), child_entry=entry,
            startup_timeout_s=600))
        try:
            node_counts[entry] = runner.start().node_count
            # The core-only graph first: nothing deferred is needed by it.
            outcomes[entry] = [
                same(runner.execute(job(f"graph{n}:1:1", graph, tmp_path / entry)))
                for n, graph in enumerate([GRAPHS["core only"], *GRAPHS.values()])]
        finally:
            runner.stop()
    deferred, eager = outcomes.values()
    low, high = node_counts.values()
    assert low < high - 200  # the deferred child did start without the built-in extras
    assert deferred == eager
    results = dict(zip(["core only", *GRAPHS], deferred, strict=True))
    assert results["extras"][0] == "done" and results["core only"][0] == "done"
    assert results["own custom node"] == ("done", [])
    missing = "Cannot execute because node OpenAIDalle3 does not exist."
    assert results["api node"][1:3] == (p.FailureKind.INVALID_WORKFLOW, missing)
    assert results["bad input"][7][0]["type"] == "value_bigger_than_max"
    # the loader's list is not checked at validation here: the node raises
    assert results["no model"][1] is p.FailureKind.NODE_ERROR
    assert results["no model"][5] == "FileNotFoundError"
