"""``runflow-worker run`` as a user runs it: a subprocess, a fake ComfyUI child."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.fakes.nvml import ONE_L4, fake_pynvml
from tests.support.cli import cli
from tests.support.factories import workflow
from tests.support.paths import REPO

GRAPH = {
    "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
    "2": {"class_type": "RunflowInputInt", "inputs": {"input_id": "count"}},
    "3": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
    "4": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}},
}


@pytest.fixture
def deployed(tmp_path: Path) -> Path:
    wf = workflow(GRAPH, inputs=[{"input_id": "count", "type": "INT", "default": 1},
                                 {"input_id": "doc", "type": "FILE"}])
    path = tmp_path / "deployed.json"
    path.write_text(json.dumps(wf))
    return path


def test_run_succeeds_and_prints_the_record(tmp_path: Path, deployed: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("x")
    out = tmp_path / "out"
    proc = cli(tmp_path, "run", str(deployed), "--input", "prompt=hello world",
                          "--input", "count=3", "--input", f"doc=@{doc}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "succeeded" and record["error"] is None
    (entry,) = record["output"]["outputs"]
    assert entry["url"].startswith("file://")
    path = Path(unquote(urlsplit(entry["url"]).path))
    assert path.is_relative_to(out) and path.read_text() == "hello world"
    assert record["billing"]["attempts"][0]["gpu_class"] == "cpu"
    assert "node 4 FakeSave" in proc.stderr  # progress on stderr, not stdout


def test_inputs_json_is_strict(tmp_path: Path, deployed: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"prompt": "p", "count": "5"}))
    proc = cli(tmp_path, "run", str(deployed), "--inputs-json", str(inputs))
    assert proc.returncode == 1
    record = json.loads(proc.stdout)
    assert record["error"]["code"] == "INVALID_INPUT"
    assert record["error"]["details"]["fields"] == ["input.count"]
    assert record["billing"]["gpu_seconds"] == 0


def test_bad_cli_inputs_name_every_key(tmp_path: Path, deployed: Path) -> None:
    proc = cli(tmp_path, "run", str(deployed), "--input", "count=three", "--input", "nope=1",
                          "--input", "doc=@/no/such/file")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "INVALID_INPUT"
    assert error["details"]["fields"] == ["input.count", "input.doc", "input.nope"]


def test_failed_run_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "deployed.json"
    path.write_text(json.dumps(workflow({"1": {"class_type": "FakeError", "inputs": {}}})))
    proc = cli(tmp_path, "run", str(path))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "NODE_ERROR"


def test_run_records_the_class_serve_would_serve(tmp_path: Path, deployed: Path) -> None:
    """No RUNFLOW_GPU_CLASS: the class comes from NVML (a fake ``pynvml`` reporting an L4),
    exactly as ``serve`` resolves it, not a blanket ``cpu``."""
    fake = fake_pynvml(tmp_path / "fake-nvml", ONE_L4)
    doc = tmp_path / "doc.txt"
    doc.write_text("x")
    proc = cli(tmp_path, "run", str(deployed), "--input", "prompt=p", "--input", f"doc=@{doc}",
                          "--quiet", env={"RUNFLOW_GPU_CLASS": None,
                                          "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["billing"]["attempts"][0]["gpu_class"] == "l4"


def test_run_with_bad_configuration_exits_2(tmp_path: Path, deployed: Path) -> None:
    proc = cli(tmp_path, "run", str(deployed), env={"RUNFLOW_GPU_CLASS": "Z80",
                                                               "RUNFLOW_LEASE_S": "inf"})
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("runflow-worker: invalid configuration: ")
    assert "RUNFLOW_GPU_CLASS: class 'z80' is not on the ladder" in line
    assert "RUNFLOW_LEASE_S: expected a finite number" in line
