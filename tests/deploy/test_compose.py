"""``compose.yaml``: the laptop stack validates against the Compose Specification and is
what the README says (Redis, an S3-compatible server, one CPU worker from the CPU image)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runflow_worker.settings import Settings
from tests.deploy.conftest import REPO, SCHEMAS, run_tool, tool, yaml

pytestmark = pytest.mark.timeout(120)

COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile.cuda"
SANDBOX_SETTINGS = {"sandbox", "child_network"}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_validates_against_the_compose_specification() -> None:
    out = run_tool(tool("check-jsonschema"), "--schemafile",
                   str(SCHEMAS / "compose-spec.json"), str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    depends_on:", "    depend_on:", 1))
    out = run_tool(tool("check-jsonschema"), "--schemafile",
                   str(SCHEMAS / "compose-spec.json"), str(bad))
    assert out.returncode != 0


def test_redis_s3_and_one_cpu_worker() -> None:
    services = _compose()["services"]
    assert services["redis"]["image"].startswith("redis:")
    assert services["minio"]["image"].startswith("minio/minio:")
    worker = services["worker"]
    assert worker["command"] == ["serve"]
    assert "deploy" not in worker or worker["deploy"].get("replicas", 1) == 1
    env = worker["environment"]
    assert env["RUNFLOW_DEVICE"] == "cpu" and env["RUNFLOW_GPU_CLASS"] == "cpu"
    assert env["RUNFLOW_REDIS_URL"].startswith("redis://redis:")
    assert env["RUNFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Every RUNFLOW_* variable is a setting, and its value is valid.
    names = {n.removeprefix("RUNFLOW_").lower() for n in env if n.startswith("RUNFLOW_")}
    assert names <= set(Settings.model_fields) | SANDBOX_SETTINGS
    Settings(**{n.removeprefix("RUNFLOW_").lower(): v for n, v in env.items()
                if n.startswith("RUNFLOW_")
                and n.removeprefix("RUNFLOW_").lower() in Settings.model_fields})
    assert "seccomp=unconfined" in worker["security_opt"]
    assert worker["depends_on"]["setup"]["condition"] == "service_completed_successfully"


def test_the_worker_is_the_documented_cpu_build() -> None:
    """The compose file builds the CPU image with exactly the arguments Dockerfile.cuda
    documents for it, and each of them is an ARG of the Dockerfile."""
    build = _compose()["services"]["worker"]["build"]
    assert build["dockerfile"] == "Dockerfile.cuda"
    text = DOCKERFILE.read_text()
    header = text.split("\nARG ", 1)[0]
    documented = dict(re.findall(r"--build-arg (\w+)=(\S*)", header.split("CPU (", 1)[1]))
    assert {k: str(v) for k, v in build["args"].items()} == documented
    declared = set(re.findall(r"^ARG (\w+)", text, flags=re.M))
    assert set(documented) <= declared


def test_readme_quick_start_shows_the_stack() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docker compose up" in readme and "compose.yaml" in readme
