"""The channel to the ComfyUI child is plain data only: a hostile child (a custom node with
the child's descriptors) can make its run fail, never run code in the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import RunnerStartFailed
from runflow_worker.runtime.runner import Runner, RunnerConfig, RunnerState
from runflow_worker.runtime.supervisor import RunnerSupervisor
from tests.fakes import FAKE_CHILD, HOSTILE_CHILD
from tests.fakes.hostile_child import pickle_frame
from tests.support.runners import job, runner_config

pytestmark = pytest.mark.timeout(120)

VIOLATION = "protocol violation from the ComfyUI process"
SAVE = {"1": {"class_type": "FakeSave", "inputs": {"text": "hi", "output_id": "o"}}}


def config(tmp_path: Path, **env: str) -> RunnerConfig:
    """The hostile child's config with ``env`` (its attacks), its canary in ``tmp_path``."""
    return runner_config(tmp_path, entry=HOSTILE_CHILD,
                         env={"hostile_canary": str(tmp_path / "canary"), **env})


def test_the_pickle_frame_would_run_code_if_unpickled(tmp_path: Path) -> None:
    # The attack is real: what the hostile child writes creates the canary when unpickled.
    import pickle

    frame = pickle_frame(str(tmp_path / "canary"))
    pickle.loads(frame[4:]).close()
    assert (tmp_path / "canary").exists()


def test_pickle_frames_on_every_descriptor_never_run_code_in_the_worker(
        tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    sup = RunnerSupervisor()
    cfg = config(tmp_path, hostile_start_marker=str(tmp_path / "attacked-at-start"))
    try:
        # At start, before Ready: a failed start.
        with pytest.raises(RunnerStartFailed) as info:
            sup.runner_for(cfg)
        assert not canary.exists()
        assert str(info.value).startswith(f"{VIOLATION}: frame is not valid UTF-8")
        assert sup.runner.state is RunnerState.DEFUNCT and sup.runner.pid is None
        # During a job: the job fails, the child is stopped.
        runner = sup.runner_for(cfg)
        pid = runner.pid
        out = runner.execute(job(tmp_path, {"0": {"class_type": "HostilePickle"}, **SAVE},
                                 "j1"))
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERNAL, out
        assert out.message.startswith(f"{VIOLATION}: frame is not valid UTF-8")
        assert "starts afresh for the next run" in out.message
        assert runner.state is RunnerState.DEFUNCT
        assert not canary.exists()
        # The next job gets a fresh child and succeeds.
        runner = sup.runner_for(cfg)
        assert runner.pid != pid
        assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)
        assert not canary.exists()
    finally:
        sup.close()


@pytest.mark.parametrize(("kind", "violation"), [
    ("oversized", "frame of 1073741824 bytes exceeds the 1048576-byte limit"),
    ("garbage", "frame is not valid UTF-8"),
    ("bad_json", "frame is not JSON"),
    ("unknown_type", "unknown message type 'Evil'"),
    ("wrong_types", "Progress.value must be an integer, got str '3'"),
    ("bad_outputs", "Done.outputs[0] has the wrong fields (missing ['node_type', 'output_id',"
                    " 'relpath']"),
    ("other_job", "Done for another job ('someone-else')"),
])
def test_a_protocol_violation_fails_the_job_and_the_next_job_runs(
        tmp_path: Path, kind: str, violation: str) -> None:
    sup = RunnerSupervisor()
    try:
        runner = sup.runner_for(config(tmp_path))
        pid = runner.pid
        graph = {"0": {"class_type": "HostileFrame", "inputs": {"kind": kind}}, **SAVE}
        out = runner.execute(job(tmp_path, graph, "j1"))
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERNAL, out
        assert out.message.startswith(f"{VIOLATION}: {violation}"), out.message
        assert runner.state is RunnerState.DEFUNCT and runner.pid is None
        runner = sup.runner_for(config(tmp_path))
        assert runner.pid != pid
        assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)
    finally:
        sup.close()


def test_a_message_before_ready_is_a_failed_start(tmp_path: Path) -> None:
    runner = Runner(config(tmp_path, hostile_stray="1"))
    try:
        with pytest.raises(RunnerStartFailed, match=f"^{VIOLATION}: NodeStarted before Ready$"):
            runner.start()
        assert runner.state is RunnerState.DEFUNCT and runner.pid is None
    finally:
        runner.stop()


def test_a_prefix_command_that_forks_the_interpreter_keeps_the_channel(tmp_path: Path) -> None:
    # As a sandbox does: the started process forks the interpreter, which still finds the
    # channel by the number in its argv; the pidfd and the group kill reach through it.
    import os
    from dataclasses import asdict

    from runflow_worker.runtime import wire
    from runflow_worker.runtime.spawn import spawn

    prefix = ["sh", "-c", '"$@"; exit $?', "sh"]  # runs the command as its child
    cfg = RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path / "base"),
                       child_entry=FAKE_CHILD, startup_timeout_s=60)
    proc, channel = spawn(cfg.child_entry, asdict(cfg), dict(os.environ), argv_prefix=prefix)
    try:
        obj = channel.recv(timeout_s=60)
        assert obj is not None and isinstance(p.child_message(obj), p.Ready)
        assert not proc.exited()
        # The started process is the shell, the interpreter its child.
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sh"
        proc.kill()
        assert wire.readable([proc.sentinel], 30), "the pidfd did not fire"
        proc.join(10)
        assert proc.exitcode is not None
    finally:
        proc.kill()
        proc.join(10)
        channel.close()
        proc.close()
