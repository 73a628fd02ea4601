"""``runflow-worker prepare`` as an operator or a deploy pipeline runs it: a subprocess, a
fake ComfyUI child, environments from local git origins, models from a local TLS server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import cli
from tests.support.factories import workflow
from tests.support.gitrepos import PACK_BROKEN, PACK_COMFY, PACK_GOOD, pack_origins
from tests.support.https_server import HTTPSServer

pytestmark = pytest.mark.timeout(120)

COMFY, GOOD, BROKEN = PACK_COMFY, PACK_GOOD, PACK_BROKEN
GRAPH = {
    "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
    "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}},
}
WEIGHTS = b"tiny model weights" * 1000


@pytest.fixture
def origins(tmp_path: Path) -> dict[str, Any]:
    found = pack_origins(tmp_path / "origins", "raise ImportError('needs libfoo')\n")
    found["mirrors"] = ",".join(f"{url}={path}" for url, path in found["paths"].items())
    return found


@pytest.fixture
def server(tmp_path: Path) -> HTTPSServer:
    with HTTPSServer() as srv:
        srv.add("/model.safetensors", WEIGHTS)
        srv.ca_file = srv.write_ca_bundle(tmp_path / "ca.pem")
        yield srv


def _deployed(tmp_path: Path, origins: dict[str, Any], nodes: dict[str, tuple[str, str]],
              models: dict[str, Any] | None = None) -> Path:
    wf = workflow(GRAPH, models=models or {})
    wf["environment"]["comfyui"] = {"origin": COMFY, "commit": origins["comfy"], "dirty": False}
    wf["custom_nodes"] = {name: {"origin": origin, "commit": origins[key], "dirty": False}
                          for name, (origin, key) in nodes.items()}
    path = tmp_path / "deployed.json"
    path.write_text(json.dumps(wf))
    return path


def _env(origins: dict[str, Any], server: HTTPSServer) -> dict[str, str | None]:
    return {"RUNFLOW_COMFYUI_DIR": None, "RUNFLOW_GIT_MIRRORS": origins["mirrors"],
            "RUNFLOW_CA_BUNDLE": str(server.ca_file), "RUNFLOW_URL_ALLOW": "127.0.0.1/32"}


def _model(server: HTTPSServer, path: str = "/model.safetensors") -> dict[str, Any]:
    return {"checkpoints/tiny.safetensors": {
        "sha256": hashlib.sha256(WEIGHTS).hexdigest(), "url": server.url(path),
        "size_bytes": len(WEIGHTS)}}


def test_prepare_builds_imports_and_fetches(tmp_path: Path, origins: dict[str, Any],
                                            server: HTTPSServer) -> None:
    deployed = _deployed(tmp_path, origins, {"ComfyUI-Good": (GOOD, "good")}, _model(server))
    done = cli(tmp_path, "prepare", str(deployed), "--models", env=_env(origins, server))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "ready"
    assert report["environment"]["custom_nodes"] == [
        {"name": "ComfyUI-Good", "commit": origins["good"]}]
    assert report["environment"]["import_failures"] == []
    assert {"environment", "models"} <= set(report["timings_ms"])
    key = report["environment"]["env_key"]
    assert (tmp_path / "cache" / "envs" / key / "READY").exists()
    digest = hashlib.sha256(WEIGHTS).hexdigest()
    blob = tmp_path / "cache" / "blobs" / "sha256" / digest[:2] / digest
    assert blob.read_bytes() == WEIGHTS
    # A prepared worker's run downloads nothing and builds nothing.
    requests_before = len(server.requests_for("/model.safetensors"))
    again = cli(tmp_path, "run", str(deployed), "--input", "prompt=hi", "--out",
                           str(tmp_path / "out"), env=_env(origins, server))
    assert again.returncode == 0, again.stderr
    assert len(server.requests_for("/model.safetensors")) == requests_before
    assert json.loads(again.stdout)["environment"]["env_key"] == key


def test_without_models_nothing_is_downloaded(tmp_path: Path, origins: dict[str, Any],
                                              server: HTTPSServer) -> None:
    deployed = _deployed(tmp_path, origins, {}, _model(server))
    done = cli(tmp_path, "prepare", str(deployed), env=_env(origins, server))
    assert done.returncode == 0, done.stderr
    assert server.requests_for("/model.safetensors") == []
    assert "models" not in json.loads(done.stdout)["timings_ms"]


def test_a_broken_pack_fails_prepare(tmp_path: Path, origins: dict[str, Any],
                                     server: HTTPSServer) -> None:
    deployed = _deployed(tmp_path, origins, {"ComfyUI-Good": (GOOD, "good"),
                                             "ComfyUI-Broken": (BROKEN, "broken")})
    done = cli(tmp_path, "prepare", str(deployed), env=_env(origins, server))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["status"] == "failed"
    assert report["error"]["code"] == "ENVIRONMENT_FAILED"
    assert "'ComfyUI-Broken': ImportError: needs libfoo" in report["error"]["message"]
    assert "ComfyUI-Broken" in done.stderr


def test_a_model_that_cannot_be_fetched_fails_prepare(tmp_path: Path, origins: dict[str, Any],
                                                      server: HTTPSServer) -> None:
    deployed = _deployed(tmp_path, origins, {}, _model(server, "/missing.safetensors"))
    done = cli(tmp_path, "prepare", str(deployed), "--models", env=_env(origins, server))
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "MODEL_FETCH_FAILED"
    assert error["details"]["fields"] == ["workflow.models.checkpoints/tiny.safetensors"]


def test_a_deployed_file_breaking_the_contract_is_refused(
    tmp_path: Path, origins: dict[str, Any], server: HTTPSServer
) -> None:
    deployed = _deployed(tmp_path, origins, {"ComfyUI-Good": (GOOD, "good")})
    wf = json.loads(deployed.read_text())
    wf["custom_nodes"]["ComfyUI-Good"]["commit"] = "main"  # not a pinned commit
    deployed.write_text(json.dumps(wf))
    done = cli(tmp_path, "prepare", str(deployed), env=_env(origins, server))
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["details"]["fields"] == ["workflow.custom_nodes.ComfyUI-Good.commit"]
    # The caller's required input ("prompt") is not asked for: only the file's own faults.
    assert all(not v["field"].startswith("input.") for v in error["details"]["violations"])
