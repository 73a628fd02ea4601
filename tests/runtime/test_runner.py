"""The runner's state machine and protocol, against a fake child speaking the real protocol."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

import pytest

from runflow_worker.cache.commands import child_environment, has_url_credentials
from runflow_worker.runtime import childlog
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import RunnerStartFailed, RunnerStateError
from runflow_worker.runtime.runner import Runner, RunnerConfig, RunnerState, describe_exit
from runflow_worker.runtime.supervisor import RunnerSupervisor
from tests.fakes import FAKE_CHILD, FORKING_CHILD
from tests.support.runners import job, runner_config


def config(tmp_path: Path, **env: str) -> RunnerConfig:
    """The fake child's config with ``env`` (its test switches: ``fake_init_fail``...)."""
    return runner_config(tmp_path, env=dict(env))


SAVE = {"1": {"class_type": "FakeSave", "inputs": {"text": "hi", "output_id": "o"}}}


@pytest.fixture
def runner(tmp_path: Path):
    r = Runner(config(tmp_path))
    yield r
    r.stop()


def test_lifecycle_and_state_checks(runner: Runner, tmp_path: Path) -> None:
    assert runner.state is RunnerState.NEW
    with pytest.raises(RunnerStateError):
        runner.execute(job(tmp_path, SAVE))
    ready = runner.start()
    assert isinstance(ready, p.Ready) and runner.state is RunnerState.READY
    with pytest.raises(RunnerStateError):
        runner.start()
    events: list[p.JobEvent] = []
    done = runner.execute(job(tmp_path, SAVE), on_event=events.append)
    assert isinstance(done, p.Done) and runner.state is RunnerState.READY
    assert done.outputs[0].relpath == "o_00001_.txt"
    assert (tmp_path / "out" / "o_00001_.txt").read_text() == "hi"
    assert [type(e) for e in events] == [p.NodeStarted]
    runner.stop()
    assert runner.state is RunnerState.DEFUNCT


def test_progress_events_reach_the_parent(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    events: list[p.JobEvent] = []
    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 0.3}}}
    assert isinstance(runner.execute(job(tmp_path, graph), on_event=events.append), p.Done)
    steps = [e for e in events if isinstance(e, p.Progress)]
    assert steps and steps[0].total == 30 and steps[-1].value > steps[0].value


def test_child_sigkilled_mid_run_is_a_readable_failure(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    pid = runner.pid
    started = threading.Event()

    def on_event(ev: p.JobEvent) -> None:
        if isinstance(ev, p.Progress) and not started.is_set():
            started.set()
            os.kill(pid, signal.SIGKILL)

    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 30}}}
    out = runner.execute(job(tmp_path, graph), on_event=on_event)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED
    assert "exit code -9 (SIGKILL)" in out.message and "out of memory" in out.message
    assert runner.state is RunnerState.DEFUNCT
    # The next run gets a fresh child.
    runner.start()
    assert runner.pid != pid and runner.restarts == 1
    assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)


def test_segfault_reported(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    graph = {"1": {"class_type": "FakeCrash", "inputs": {"signal": int(signal.SIGSEGV)}}}
    out = runner.execute(job(tmp_path, graph))
    assert isinstance(out, p.Failed) and "SIGSEGV" in out.message


def test_interrupt_lands_quickly(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    asked = threading.Event()
    graph = {"1": {"class_type": "FakeSleep", "inputs": {"seconds": 30}}}
    timer = threading.Timer(0.3, asked.set)
    timer.start()
    t0 = time.monotonic()
    out = runner.execute(job(tmp_path, graph), should_interrupt=asked.is_set)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERRUPTED
    assert time.monotonic() - t0 < 0.3 + 2.0
    assert runner.state is RunnerState.READY  # the child honoured it and stays warm
    assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)


def test_child_ignoring_interrupt_is_killed(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    graph = {"1": {"class_type": "FakeBusy", "inputs": {"seconds": 60}}}
    t0 = time.monotonic()
    out = runner.execute(job(tmp_path, graph), should_interrupt=lambda: True)
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERRUPTED
    assert time.monotonic() - t0 < 2.0
    assert runner.state is RunnerState.DEFUNCT


def test_failures_keep_the_child(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    pid = runner.pid
    for kind, expected in (("FakeError", p.FailureKind.NODE_ERROR),
                           ("FakeOOM", p.FailureKind.OUT_OF_MEMORY),
                           ("FakeUnknown", p.FailureKind.INVALID_WORKFLOW)):
        out = runner.execute(job(tmp_path, {"7": {"class_type": kind, "inputs": {}}}))
        assert isinstance(out, p.Failed) and out.kind is expected and out.node_id == "7"
    assert runner.pid == pid and runner.state is RunnerState.READY


def test_init_failure(tmp_path: Path) -> None:
    r = Runner(config(tmp_path, fake_init_fail="1"))
    with pytest.raises(RunnerStartFailed) as info:
        r.start()
    assert "fake init failure" in str(info.value)
    assert r.state is RunnerState.DEFUNCT


def test_startup_timeout(tmp_path: Path) -> None:
    cfg = RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path), child_entry=FAKE_CHILD,
                       startup_timeout_s=0.5, env={"fake_init_delay_s": "30"})
    r = Runner(cfg)
    with pytest.raises(RunnerStartFailed, match="did not start"):
        r.start()
    assert r.state is RunnerState.DEFUNCT


def test_supervisor_restarts_dead_and_switches_environment(tmp_path: Path) -> None:
    sup = RunnerSupervisor()
    try:
        a = sup.runner_for(config(tmp_path))
        pid = a.pid
        assert sup.runner_for(config(tmp_path)).pid == pid  # warm
        os.kill(pid, signal.SIGKILL)
        out = a.execute(job(tmp_path, SAVE))
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED
        b = sup.runner_for(config(tmp_path))
        assert b.pid != pid and b.state is RunnerState.READY
        other = RunnerConfig(**{**config(tmp_path).__dict__, "env_key": "other"})
        c = sup.runner_for(other)
        assert c is not b and b.state is RunnerState.DEFUNCT
    finally:
        sup.close()


def test_supervisor_says_whether_it_started_a_child(tmp_path: Path) -> None:
    """``acquire`` and ``reacquire`` say whether the call started a child (the run's cold
    start); ``warm_env_key`` names the environment of a live child only."""
    sup = RunnerSupervisor()
    try:
        assert sup.warm_env_key is None
        first = sup.acquire(config(tmp_path))
        assert first.started and sup.warm_env_key == "default"
        again = sup.reacquire(first.runner)
        assert not again.started and again.runner is first.runner  # alive: the same one
        pid = first.runner.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until_gone(first.runner)
        restarted = sup.reacquire(first.runner)  # died while idle: restarted
        assert restarted.started and restarted.runner.pid != pid
        assert sup.restarts == 1 and sup.warm_env_key == "default"
        assert not sup.acquire(config(tmp_path)).started
    finally:
        sup.close()
    assert sup.warm_env_key is None


def test_describe_exit() -> None:
    assert describe_exit(1) == "exit code 1"
    assert "SIGSEGV" in describe_exit(-11)


def test_start_can_be_interrupted(tmp_path: Path) -> None:
    from runflow_worker.runtime.errors import RunnerStartCanceled

    r = Runner(config(tmp_path, fake_init_delay_s="60"))
    asked = threading.Event()
    threading.Timer(0.3, asked.set).start()
    t0 = time.monotonic()
    with pytest.raises(RunnerStartCanceled):
        r.start(should_stop=asked.is_set)
    assert time.monotonic() - t0 < 0.3 + 2.0
    assert r.state is RunnerState.DEFUNCT and r.pid is None


# ------------------------------------------------------------------ a child dead while idle


def wait_until_gone(runner: Runner) -> None:
    """Block until the runner's child has exited (its sentinel fired)."""
    assert runner._proc is not None
    assert wait([runner._proc.sentinel], timeout=30), "the child did not die"


def test_child_dead_while_idle_is_restarted_before_the_next_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sup = RunnerSupervisor()
    try:
        first = sup.runner_for(config(tmp_path))
        assert isinstance(first.execute(job(tmp_path, SAVE, "j1")), p.Done)
        pid = first.pid
        os.kill(pid, signal.SIGKILL)  # the OOM killer, while no job runs
        wait_until_gone(first)
        with caplog.at_level(logging.WARNING, logger="runflow_worker.runtime.runner"):
            runner = sup.runner_for(config(tmp_path))
        assert runner.state is RunnerState.READY and runner.pid != pid
        assert sup.restarts == 1  # what feeds runflow_runner_restarts_total
        assert "exit code -9 (SIGKILL), probably out of memory" in (runner.last_exit or "")
        assert "exit code -9 (SIGKILL)" in caplog.text
        assert isinstance(runner.execute(job(tmp_path, SAVE, "j2")), p.Done)
    finally:
        sup.close()


def test_execute_on_a_child_dead_while_idle_reports_its_exit(runner: Runner,
                                                              tmp_path: Path) -> None:
    runner.start()
    os.kill(runner.pid, signal.SIGKILL)
    wait_until_gone(runner)
    out = runner.execute(job(tmp_path, SAVE))
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED
    assert "exit code -9 (SIGKILL)" in out.message and "before the run started" in out.message
    assert runner.state is RunnerState.DEFUNCT


# ------------------------------------------------------------------ processes the child forked

def forking_runner(tmp_path: Path) -> tuple[Runner, Path]:
    """A runner whose child forks a helper at start; the helper's pid lands in the file."""
    pidfile = tmp_path / "helper.pid"
    cfg = runner_config(tmp_path, entry=FORKING_CHILD, env={"fake_helper_pidfile": str(pidfile)})
    return Runner(cfg), pidfile


def group_gone(pgid: int, timeout_s: float) -> bool:
    """Poll until no process of group ``pgid`` is left (killed ones are reaped by init)."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        tick.wait(0.02)


def kill_helper(pidfile: Path) -> None:
    """Cleanup for when the runner failed to kill the helper (the test fails then)."""
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


def own_group(runner: Runner, pidfile: Path) -> int:
    """The child's process group: its own, apart from the test's, and the helper's too."""
    pgid = runner.pid
    assert pgid is not None
    assert os.getpgid(pgid) == pgid != os.getpgrp()
    assert os.getpgid(int(pidfile.read_text())) == pgid
    return pgid


@pytest.mark.timeout(60)
def test_a_crash_is_noticed_while_a_process_the_child_forked_lives(tmp_path: Path) -> None:
    runner, pidfile = forking_runner(tmp_path)
    try:
        runner.start()
        pgid = own_group(runner, pidfile)
        t0 = time.monotonic()
        # The helper holds the pipe and the sentinel: only the child's exit status tells.
        out = runner.execute(job(tmp_path, {"1": {"class_type": "FakeCrash", "inputs": {}}}),
                             should_interrupt=lambda: time.monotonic() - t0 > 20)
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.CHILD_DIED, out
        assert out.message == ("the ComfyUI process died during the run: exit code -9 "
                               "(SIGKILL), probably out of memory (or killed by the operator)")
        assert time.monotonic() - t0 < 5  # not at the run's timeout
        assert runner.state is RunnerState.DEFUNCT
        runner.stop()
        assert group_gone(pgid, timeout_s=10), "a process the dead child forked survived"
    finally:
        runner.stop()
        kill_helper(pidfile)


@pytest.mark.timeout(60)
def test_stop_leaves_nothing_the_child_forked(tmp_path: Path) -> None:
    runner, pidfile = forking_runner(tmp_path)
    try:
        runner.start()
        pgid = own_group(runner, pidfile)
        assert isinstance(runner.execute(job(tmp_path, SAVE)), p.Done)
        runner.stop()  # the child exits on Shutdown; its helper would live on
        assert group_gone(pgid, timeout_s=10), "a process the child forked survived stop()"
    finally:
        runner.stop()
        kill_helper(pidfile)


# ------------------------------------------------------------------ plain data


def test_child_sends_only_plain_data(runner: Runner, tmp_path: Path) -> None:
    runner.start()
    pid = runner.pid
    out = runner.execute(job(tmp_path, {"3": {"class_type": "FakeOddDetails", "inputs": {}}}))
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INVALID_WORKFLOW
    config_ = out.details["errors"][0]["extra_info"]["input_config"]
    assert config_ == ["*", {"marker": "<class 'runflow_fake_child_only.AnyType'>"}]
    assert type(config_[0]) is str
    assert runner.state is RunnerState.READY and runner.pid == pid


def test_plain() -> None:
    class Tag(str):
        pass

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    cyclic: dict = {}
    cyclic["self"] = cyclic
    value = {"t": (Tag("*"), {1: float("nan")}), "o": Unprintable(), "s": {3}, "c": cyclic}
    out = p.plain(value)
    assert out["t"] == ["*", {"1": "nan"}] and type(out["t"][0]) is str
    assert out["o"] == "<unrepresentable Unprintable>" and out["s"] == [3]
    assert json.dumps(out)  # JSON-safe, cycle cut
    msg = p.plain_message(p.Done("j", (p.OutputFile("1", Tag("X"), "a.txt", None),), 1.0))
    assert type(msg.outputs[0].node_type) is str and isinstance(msg.outputs, tuple)


def test_a_raising_event_callback_never_leaves_the_runner_busy(runner: Runner,
                                                                tmp_path: Path) -> None:
    runner.start()

    def on_event(ev: p.JobEvent) -> None:
        raise KeyError("callback bug")

    with pytest.raises(KeyError):
        runner.execute(job(tmp_path, SAVE), on_event=on_event)
    assert runner.state is RunnerState.DEFUNCT and runner.pid is None


# ------------------------------------------------------------------ a child that stops reading


def test_a_large_job_to_a_wedged_child_is_still_interruptible(tmp_path: Path) -> None:
    runner = Runner(config(tmp_path, fake_wedged="1"))
    try:
        runner.start()
        # Far larger than a socket buffer: the write blocks as long as the child does not
        # read (distinct strings: pickle would write a shared one once).
        graph = {str(i): {"class_type": "FakeSave", "inputs": {"text": f"{i:08d}" * 125}}
                 for i in range(8000)}
        asked = threading.Event()
        outcome: list[p.Done | p.Failed] = []
        t0 = time.monotonic()
        worker = threading.Thread(target=lambda: outcome.append(runner.execute(
            job(tmp_path, graph), should_interrupt=asked.is_set)), daemon=True)
        worker.start()
        asked.set()
        worker.join(timeout=10)
        assert outcome, "execute stayed blocked writing the job"
        out = outcome[0]
        assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERRUPTED
        assert time.monotonic() - t0 < 2.5
        assert runner.state is RunnerState.DEFUNCT
    finally:
        if runner.pid is not None:  # only after a failure: unblock the writing thread
            os.kill(runner.pid, signal.SIGKILL)
        runner.stop()


# ------------------------------------------------------------------ the child's environment


def test_child_environment_rules() -> None:
    env = {"PATH": "/bin", "HOME": "/h", "HF_HOME": "/hf", "HTTPS_PROXY": "http://p:3128",
           "LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "x",
           "RUNFLOW_REDIS_URL": "redis://u:pw@r", "RUNFLOW_WEBHOOK_SECRET": "whsec_x",
           "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "GITHUB_TOKEN": "t",
           "HF_TOKEN": "hf", "DB_PASSWORD": "p", "PGPASSWD": "p", "OPENAI_API_KEY": "k",
           "GOOGLE_APPLICATION_CREDENTIALS": "/c.json", "my_client_secret": "s"}
    # Credentials in the value, whatever the name; the pass list keeps one anyway.
    env |= {"PIP_INDEX_URL": "https://user:tok@pypi.internal/simple",
            "http_proxy": "http://u:p@proxy:3128", "ALL_PROXY": "socks5://u:p@proxy:1080",
            "NO_PROXY": "localhost", "MIRRORS": "https://a.example https://:pw@b.example",
            "HF_ENDPOINT": "https://hf.internal:8443/@mirror", "GIT_URL": "https://bot@git.x"}
    out = child_environment(env, passed=("HF_TOKEN", "NOT_SET", "ALL_PROXY"),
                            extra={"EXTRA": "1"})
    assert out == {"PATH": "/bin", "HOME": "/h", "HF_HOME": "/hf",
                   "HTTPS_PROXY": "http://p:3128", "LANG": "C.UTF-8",
                   "CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "x",
                   "HF_TOKEN": "hf", "ALL_PROXY": "socks5://u:p@proxy:1080",
                   "NO_PROXY": "localhost", "HF_ENDPOINT": "https://hf.internal:8443/@mirror",
                   "EXTRA": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("setting", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"},
                                     {"KMP_BLOCKTIME": "1"}])
def test_an_operators_openmp_wait_setting_is_kept(setting: dict[str, str]) -> None:
    """The child's OpenMP threads sleep when idle unless the worker's environment says how
    they wait: then the operator's setting holds alone, nothing is added beside it."""
    assert child_environment({"PATH": "/bin", **setting}) == {"PATH": "/bin", **setting}
    assert child_environment({"PATH": "/bin"}, extra=setting) == {"PATH": "/bin", **setting}


@pytest.mark.parametrize("name", ["SMTP_PASS", "MYSQL_PWD", "AZURE_STORAGE_CONNECTION_STRING",
                                  "STRIPE_APIKEY", "DEPLOY_PRIVATE_KEY_PEM", "DOCKER_AUTH_CONFIG",
                                  "NPM_AUTH"])
def test_more_credential_names_are_dropped(name: str) -> None:
    """Names credentials commonly go by although no SECRET, TOKEN or PASSWORD is in them."""
    kept = child_environment({name: "hunter2", "PWD": "/app", "OLDPWD": "/",
                              "PASSAGE": "kept"})
    assert kept == {"PWD": "/app", "OLDPWD": "/", "PASSAGE": "kept",
                    "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(("value", "credential"), [
    ("https://user:tok@pypi.internal/simple", True),
    ("redis://:pw@redis:6379/0", True),  # no user, a password
    ("see HTTP://U:P@PROXY:3128 first", True),
    ("https://ghp_token@github.com/x", True),  # a token in the user's place
    ("https://user:@host/", True),
    ("https://host:8443/@scope/pkg", False),  # an @ in the path
    ("user:pass@host", False),  # no scheme: not a URL
])
def test_url_credentials_are_found_in_values(value: str, credential: bool) -> None:
    assert has_url_credentials(value) is credential


def test_child_process_environment_has_no_secrets(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret", "RUNFLOW_WEBHOOK_SECRET": "whsec_abc",
               "RUNFLOW_REDIS_URL": "redis://:pw@redis:6379/0", "GITHUB_TOKEN": "ghp_x",
               "OPENAI_API_KEY": "sk-x", "PIP_INDEX_URL": "https://user:tok@pypi.internal/s"}
    for name, value in {**secrets, "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    cfg = RunnerConfig(**{**config(tmp_path, EXTRA_FLAG="1").__dict__,
                          "env_pass": ("HF_TOKEN",)})
    runner = Runner(cfg)
    try:
        runner.start()
        raw = Path(f"/proc/{runner.pid}/environ").read_bytes()
        seen = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        assert not set(secrets) & set(seen)
        assert not any(value in raw.decode() for value in secrets.values())
        assert seen["HF_TOKEN"] == "hf_x" and seen["HF_HOME"] == str(tmp_path)
        assert seen["PATH"] == os.environ["PATH"] and seen["EXTRA_FLAG"] == "1"
        assert isinstance(runner.execute(job(tmp_path, SAVE)), p.Done)
    finally:
        runner.stop()


# ------------------------------------------------------------------ the child's log lines


def test_child_log_formatter() -> None:
    formatter = childlog.ChildJsonFormatter()
    try:
        raise ValueError("fetching https://b.s3/x?X-Amz-Signature=abc failed")
    except ValueError:
        record = logging.LogRecord("root", logging.ERROR, __file__, 1,
                                   "!!! Exception during processing !!! %s", ("whsec_abc",),
                                   sys.exc_info())
    childlog.set_job("run-7:1:99")
    try:
        line = formatter.format(record)
    finally:
        childlog.set_job(None)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "error" and out["logger"] == "root" and out["ts"]
    assert out["run_id"] == "run-7" and out["job_id"] == "run-7:1:99"
    assert "Traceback (most recent call last)" in out["msg"] and "ValueError" in out["msg"]
    assert "whsec_abc" not in line and "X-Amz-Signature" not in line
    assert "run_id" not in json.loads(formatter.format(record))


def test_child_logs_reach_the_worker_log_with_the_run_id(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = Runner(config(tmp_path))
    try:
        with caplog.at_level(logging.DEBUG, logger="runflow.comfyui"):
            runner.start()
            graph = {"1": {"class_type": "FakeLog", "inputs": {
                "text": "first line\nsecond line whsec_abc",
                "url": "https://bucket.s3/key?X-Amz-Signature=abc"}}}
            assert isinstance(runner.execute(job(tmp_path, graph, "run-42:1:7")), p.Done)
            relay = runner._proc.output
            runner.stop()
            assert relay.join(timeout_s=10), "the output thread outlived the child"
    finally:
        runner.stop()
    ours = [r for r in caplog.records
            if r.name == "runflow.comfyui" and getattr(r, "child_logger", None) == "fake.node"]
    assert len(ours) == 2, [r.getMessage() for r in caplog.records]
    assert all(r.run_id == "run-42" and r.job_id == "run-42:1:7" for r in ours)
    assert all(r.origin == "comfyui" for r in ours)
    assert ours[0].levelno == logging.ERROR
    assert ours[0].getMessage() == "first line\nsecond line [redacted]"
    assert "Traceback" in ours[1].getMessage()
    assert "ValueError: fake failure" in ours[1].getMessage()
    assert "X-Amz-Signature" not in ours[1].getMessage()


def test_a_long_record_stays_one_line_within_the_relays_limit() -> None:
    formatter = childlog.ChildJsonFormatter()
    text = "start " + "\u00e9\n" * 40_000 + " the exception at the end"
    record = logging.LogRecord("n" * 5000, logging.ERROR, __file__, 1, "%s", (text,), None)
    line = formatter.format(record)
    assert len(line.encode()) <= childlog.LINE_MAX_BYTES and "\n" not in line
    out = json.loads(line)
    assert out["msg"].startswith("start ") and out["msg"].endswith(" the exception at the end")
    assert "characters cut ..." in out["msg"] and len(out["logger"]) == 200
