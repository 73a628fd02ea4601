"""A warm ComfyUI child that loads custom nodes serves one owner only (SPEC §9)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline
from runflow_worker.runtime.customnodes import custom_node_entries, loads_custom_nodes
from runflow_worker.runtime.runner import RunnerConfig, RunnerState
from runflow_worker.runtime.supervisor import RunnerSupervisor
from tests.fakes.control import RecordingControl
from tests.support.factories import message, workflow
from tests.support.pipelines import checkout_pipeline
from tests.support.runners import gone, runner_config

pytestmark = pytest.mark.timeout(60)


def test_custom_code_child_is_reused_by_its_owner_only(sup: RunnerSupervisor,
                                                       tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    first = sup.acquire(cfg, owner="alice")
    assert first.started and first.runner.state is RunnerState.READY
    pid = first.runner.pid
    again = sup.acquire(cfg, owner="alice")
    assert not again.started and again.runner.pid == pid  # same owner and env: warm
    other = sup.acquire(cfg, owner="bob")
    assert other.started and other.runner.pid != pid
    assert gone(pid)  # stopped (and reaped) before bob's child started
    assert first.runner.state is RunnerState.DEFUNCT
    assert sup.restarts == 0  # an owner switch is no restart after a death


def test_no_owner_is_an_owner_of_its_own(sup: RunnerSupervisor, tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    named_pid = sup.acquire(cfg, owner="alice").runner.pid
    anonymous = sup.acquire(cfg, owner=None)
    assert anonymous.started and anonymous.runner.pid != named_pid and gone(named_pid)
    assert not sup.acquire(cfg, owner=None).started  # None runs share with each other
    back = sup.acquire(cfg, owner="alice")
    assert back.started and back.runner.pid != anonymous.runner.pid
    # The string "None" is a name like any other, never the missing owner.
    assert sup.acquire(cfg, owner="None").started


def test_child_without_custom_nodes_is_shared(sup: RunnerSupervisor, tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=False)
    first = sup.acquire(cfg, owner="alice")
    pid = first.runner.pid
    for owner in ("bob", None, "alice"):
        lease = sup.acquire(cfg, owner=owner)
        assert not lease.started and lease.runner.pid == pid
    # The same environment loading custom nodes is another child.
    switched = sup.acquire(replace(cfg, custom_code=True), owner="alice")
    assert switched.started and switched.runner.pid != pid and gone(pid)


def test_warm_config_names_the_child_a_run_may_take_as_it_is(sup: RunnerSupervisor,
                                                            tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    assert sup.warm_config(cfg.env_key, "alice") is None  # no child yet
    sup.acquire(cfg, owner="alice")
    assert sup.warm_config(cfg.env_key, "alice") == cfg
    assert sup.warm_config(cfg.env_key, "alice", custom_code=True) == cfg
    assert sup.warm_config(cfg.env_key, "bob") is None  # a stranger's code serves one owner
    assert sup.warm_config("another-env", "alice") is None
    shared = replace(cfg, custom_code=False)
    sup.acquire(shared, owner="alice")
    assert sup.warm_config(cfg.env_key, "bob") == shared
    assert sup.warm_config(cfg.env_key, "bob", custom_code=True) is None  # bob's own packs


def test_runner_for_keeps_its_answer(sup: RunnerSupervisor, tmp_path: Path) -> None:
    cfg = runner_config(tmp_path, custom_code=True)
    a = sup.runner_for(cfg, owner="alice")
    assert sup.runner_for(cfg, owner="alice") is a
    assert sup.runner_for(cfg, owner="bob") is not a


def test_custom_node_listing_follows_comfyui(tmp_path: Path) -> None:
    nodes = tmp_path / "custom_nodes"
    assert custom_node_entries(nodes) == [] and not loads_custom_nodes([nodes])
    nodes.mkdir()
    (nodes / "websocket_image_save.py").write_text("# ComfyUI's own\n")
    (nodes / "example_node.py.example").write_text("")
    (nodes / "__pycache__").mkdir()
    (nodes / "old.disabled").mkdir()
    (nodes / "README.md").write_text("")
    assert custom_node_entries(nodes) == [] and not loads_custom_nodes([str(nodes)])
    (nodes / "pack").mkdir()
    (nodes / "single.py").write_text("")
    assert custom_node_entries(nodes) == ["pack", "single.py"]
    assert loads_custom_nodes([tmp_path / "absent", nodes])


# ------------------------------------------------------------------ through a real run


def run_as(pipeline: Pipeline, owner: str | None, run_id: str):
    result = pipeline.execute(parse_message(message(wf=workflow(owner=owner), run_id=run_id)),
                              RecordingControl())
    assert result.status is RunStatus.SUCCEEDED, result.failure
    runner = pipeline.supervisor.runner
    assert runner is not None and runner.pid is not None
    return result, runner.pid


def test_pipeline_gives_another_owner_a_fresh_child(tmp_path: Path) -> None:
    pipeline = checkout_pipeline(tmp_path, with_nodes=True)
    try:
        first, pid = run_as(pipeline, "acme", "own-1")
        assert first.cold_start_s > 0
        warm, warm_pid = run_as(pipeline, "acme", "own-2")
        assert warm_pid == pid and warm.cold_start_s == 0
        other, other_pid = run_as(pipeline, "globex", "own-3")
        assert other_pid != pid and gone(pid)
        assert other.cold_start_s > 0  # the owner switch is this run's cold start
        anonymous, anonymous_pid = run_as(pipeline, None, "own-4")
        assert anonymous_pid != other_pid and gone(other_pid) and anonymous.cold_start_s > 0
    finally:
        pipeline.close()


def test_pipeline_shares_a_child_without_custom_nodes(tmp_path: Path) -> None:
    pipeline = checkout_pipeline(tmp_path, with_nodes=False)
    try:
        _, pid = run_as(pipeline, "acme", "shared-1")
        for i, owner in enumerate(("globex", None), start=2):
            result, again = run_as(pipeline, owner, f"shared-{i}")
            assert again == pid and result.cold_start_s == 0
    finally:
        pipeline.close()


class _SpyBlobs:
    """A blob store whose every blob is present; it notes whose child was warm at each
    link (the links directory is bound into the warm child)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.linked = threading.Event()
        self.seen: list[tuple[str, object]] = []

    def ensure_many(self, items, **_: object) -> dict:
        return {}

    def hardlink(self, sha256: str, dest: Path, *, base: Path | None = None) -> Path:
        self.seen.append((dest.name, self.pipeline.supervisor.tenant))
        dest.parent.mkdir(parents=True, exist_ok=True)  # as the store's link makes them
        dest.write_text(sha256)
        self.linked.set()
        return dest

    def usable(self, sha256: str, owner: str | None) -> bool:
        return True

    def pin(self, digests: object) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def test_a_run_links_its_models_only_once_the_previous_owners_child_is_gone(
        tmp_path: Path) -> None:
    """The models (and resources) are linked where every warm child can read them: never
    while the child of the run before, another owner's, is still there."""
    pipeline = checkout_pipeline(tmp_path, with_nodes=True)
    blobs = pipeline.blobs = _SpyBlobs(pipeline)
    acquire = pipeline.supervisor.acquire

    def slow_acquire(config: RunnerConfig, *, owner: str | None = None, **kw: object):
        # The switch to another owner's child is slow (a cold start): the models phase,
        # running meanwhile, may link first only if it does not wait for it.
        if owner == "globex":
            blobs.linked.wait(timeout=3)
        return acquire(config, owner=owner, **kw)

    pipeline.supervisor.acquire = slow_acquire  # type: ignore[method-assign]
    try:
        for owner, name in (("acme", "acme.safetensors"), ("globex", "globex.safetensors")):
            blobs.linked.clear()
            wf = workflow(owner=owner, models={name: {"sha256": "ab" * 32,
                                                      "url": "https://models.invalid/m"}})
            result = pipeline.execute(parse_message(message(wf=wf, run_id=f"link-{owner}")),
                                      RecordingControl())
            assert result.status is RunStatus.SUCCEEDED, result.failure
    finally:
        pipeline.close()
    assert blobs.seen == [("acme.safetensors", ("owner", "acme")),
                          ("globex.safetensors", ("owner", "globex"))]
