"""The published JSON Schemas are what the models give, and ``--version`` names the package."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from runflow_worker.cli.main import main
from runflow_worker.run import schemas

REPO = Path(__file__).parents[2]


def test_published_schemas_are_current() -> None:
    # Fails when runflow_worker/run/contract.py changed without `python -m runflow_worker.run.schemas`.
    assert schemas.stale() == []


def test_check_finds_a_stale_or_missing_file(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 0
    record = tmp_path / "run-record.schema.json"
    data = json.loads(record.read_text())
    del data["properties"]["warnings"]
    record.write_text(schemas.render(data))
    (tmp_path / "run-message.schema.json").unlink()
    assert sorted(schemas.stale(tmp_path)) == ["run-message.schema.json",
                                               "run-record.schema.json"]
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1


def test_schemas_describe_the_message_and_the_record() -> None:
    message = json.loads((schemas.SCHEMA_DIR / "run-message.schema.json").read_text())
    record = json.loads((schemas.SCHEMA_DIR / "run-record.schema.json").read_text())
    assert {"run_id", "workflow"} <= set(message["required"])
    assert "DeployedWorkflow" in message["$defs"]
    assert {"id", "status"} <= set(record["required"])
    assert set(record["$defs"]["RunStatus"]["enum"]) == {
        "queued", "running", "succeeded", "failed", "canceled"}


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"runflow-worker {expected}"
