"""A declared custom node pack that fails to import fails the run ENVIRONMENT_FAILED before
the graph runs; every record lists the packs loaded and their commits."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.cache.environments import Environments
from runflow_worker.cache.git import GitMirrors
from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.envreport import head_commit
from runflow_worker.run.pipeline import Pipeline
from tests.fakes.control import RecordingControl
from tests.support.factories import message, workflow
from tests.support.gitrepos import (
    PACK_BROKEN,
    PACK_COMFY,
    PACK_GOOD,
    commit,
    make_repo,
    pack_origins,
)
from tests.support.pipelines import make_pipeline

pytestmark = pytest.mark.timeout(120)

COMFY, GOOD, BROKEN = PACK_COMFY, PACK_GOOD, PACK_BROKEN
BROKEN_INIT = (
    "import helper_that_is_not_installed  # a requirement the environment lacks\n"
    "NODE_CLASS_MAPPINGS = {}\n"
)


@pytest.fixture
def origins(tmp_path: Path) -> dict[str, Any]:
    return pack_origins(tmp_path / "origins", BROKEN_INIT)


def _pipeline(tmp_path: Path, origins: dict[str, Any], **config: Any) -> Pipeline:
    envs = Environments(tmp_path / "cache" / "envs",
                        GitMirrors(tmp_path / "cache" / "git", origins["paths"]))
    return make_pipeline(tmp_path, comfyui_dir=None, environments=envs, **config)


PACKS = {"ComfyUI-Good": (GOOD, "good"), "ComfyUI-Broken": (BROKEN, "broken")}


def _message(origins: dict[str, Any], names: list[str], run_id: str = "packs-1"):
    wf = workflow()
    wf["environment"]["comfyui"] = {"origin": COMFY, "commit": origins["comfy"], "dirty": False}
    wf["custom_nodes"] = {name: {"origin": PACKS[name][0], "commit": origins[PACKS[name][1]],
                                 "dirty": False} for name in names}
    return parse_message(message(wf=wf, run_id=run_id))


def test_a_declared_pack_that_fails_to_import_fails_the_run(
    tmp_path: Path, origins: dict[str, Any]
) -> None:
    pipeline = _pipeline(tmp_path, origins)
    try:
        result = pipeline.execute(
            _message(origins, ["ComfyUI-Good", "ComfyUI-Broken"]), RecordingControl())
    finally:
        pipeline.close()
    assert result.status is RunStatus.FAILED
    error = result.failure.as_error()
    assert error["code"] == ErrorCode.ENVIRONMENT_FAILED.value
    assert "'ComfyUI-Broken'" in error["message"]
    assert error["message"].endswith("'ComfyUI-Broken': ModuleNotFoundError: No module named "
                                     "'helper_that_is_not_installed'")
    excerpt = error["details"]["import_errors"]["ComfyUI-Broken"]
    assert excerpt.startswith("Traceback") and "ModuleNotFoundError" in excerpt
    assert "execute" not in result.timings_ms  # the graph never ran
    assert result.output is None
    # The record still says what the environment had.
    assert result.environment["import_failures"] == ["ComfyUI-Broken"]
    assert result.environment["custom_nodes"] == [
        {"name": "ComfyUI-Good", "commit": origins["good"]}]


def test_packs_loaded_and_their_commits_are_recorded(
    tmp_path: Path, origins: dict[str, Any]
) -> None:
    # A broken pack the workflow does not declare (an operator's extra directory) is
    # recorded, and the run goes on: the workflow was not made with it.
    extra = tmp_path / "extra-nodes"
    (extra / "OperatorPack").mkdir(parents=True)
    (extra / "OperatorPack" / "__init__.py").write_text("raise RuntimeError('operator pack')\n")
    (extra / "single_file.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    pipeline = _pipeline(tmp_path, origins, extra_custom_node_dirs=(extra,))
    try:
        result = pipeline.execute(_message(origins, ["ComfyUI-Good"]), RecordingControl())
    finally:
        pipeline.close()
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert result.environment["custom_nodes"] == [
        {"name": "ComfyUI-Good", "commit": origins["good"]},
        {"name": "single_file.py", "commit": None},
    ]
    assert result.environment["import_failures"] == ["OperatorPack"]


def test_head_commit_reads_checkouts_and_worktrees(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    first = commit(repo, {"a.py": "1\n"})
    assert head_commit(repo) == first  # HEAD names a branch
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--quiet", "--detach",
                    str(tmp_path / "wt"), first], check=True, timeout=60)
    assert head_commit(tmp_path / "wt") == first  # a worktree at a detached HEAD
    subprocess.run(["git", "-C", str(repo), "pack-refs", "--all"], check=True, timeout=60)
    assert head_commit(repo) == first  # the branch only in packed-refs
    assert head_commit(tmp_path) is None
