"""The bubblewrap sandbox itself: what it shows, capabilities, killing it, the probe, the
operator's choice (``RUNFLOW_SANDBOX``) and the refusal to start without a sandbox."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.cli.doctor import doctor_command
from runflow_worker.run.outputs import UnsafeOutput, open_output
from runflow_worker.runtime.sandbox import SandboxPlan, SandboxUnavailable, command_prefix, probe
from runflow_worker.settings import Settings
from tests.fakes import FORKING_CHILD
from tests.support.cli import cli

REPO = Path(__file__).parents[2]
HAVE_BWRAP = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v bwrap"], capture_output=True).returncode != 0,
    reason="bubblewrap (bwrap) is not installed")
pytestmark = pytest.mark.timeout(120)

PY = sys.executable


def _inside(plan: SandboxPlan, code: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([*command_prefix(plan, env), PY, "-c", code], capture_output=True,
                          text=True, timeout=60, check=False, **kw)


@HAVE_BWRAP
def test_capabilities_are_dropped_after_the_scratch_layer_is_mounted(tmp_path: Path) -> None:
    layer = tmp_path / "pack"
    layer.mkdir()
    (layer / "own.txt").write_text("shipped")
    code = ("import json\n"
            "open('%s/own.txt', 'a').write(' and changed')\n"
            "caps = {l.split(':')[0]: l.split(':')[1].strip() for l in open('/proc/self/status')"
            " if l.startswith('Cap')}\n"
            "print(json.dumps({'caps': caps, 'own': open('%s/own.txt').read()}))\n"
            % (layer, layer))
    done = _inside(SandboxPlan(read_only=(str(layer),), scratch_layers=(str(layer),)), code)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for name in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(seen["caps"][name], 16) == 0, seen["caps"]
    assert seen["own"] == "shipped and changed"  # written in the scratch layer...
    assert (layer / "own.txt").read_text() == "shipped"  # ...which died with the sandbox


@HAVE_BWRAP
def test_a_sandbox_without_scratch_layers_has_no_capability_either(tmp_path: Path) -> None:
    """An environment build's sandbox (no scratch layer): were the worker root, bwrap would
    keep its capabilities inside its user namespace, enough to remount a read-only bind
    writable or unmount the tmpfs hiding the cache volume."""
    shown = tmp_path / "shown"
    (shown / "hidden").mkdir(parents=True)
    (shown / "hidden" / "blob").write_text("another tenant's")
    code = ("import json, subprocess\n"
            "caps = {l.split(':')[0]: l.split(':')[1].strip() for l in open('/proc/self/status')"
            " if l.startswith('Cap')}\n"
            "def ok(*argv):\n"
            "    return subprocess.run(argv, capture_output=True).returncode == 0\n"
            "print(json.dumps({'caps': caps,\n"
            f"    'remount': ok('mount', '-o', 'remount,bind,rw', '{shown}'),\n"
            f"    'unmask': ok('umount', '-l', '{shown / 'hidden'}')}}))\n")
    done = _inside(SandboxPlan(read_only=(str(shown),), hidden=(str(shown / "hidden"),)), code)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for name in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(seen["caps"][name], 16) == 0, seen["caps"]
    assert seen["remount"] is False and seen["unmask"] is False


@HAVE_BWRAP
def test_only_the_whitelist_is_visible_and_only_writable_paths_are_writable(
        tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the child")
    ro, rw, cache = tmp_path / "ro", tmp_path / "rw", tmp_path / "cache"
    for d in (ro, rw, cache / "blobs", cache / "work" / "mine"):
        d.mkdir(parents=True)
    (cache / "blobs" / "blob").write_text("blob")
    plan = SandboxPlan(read_only=(str(ro), str(cache)), hidden=(str(cache),),
                       writable=(str(rw), str(cache / "work" / "mine")))
    code = f"""
import json, os
def can_write(d):
    try:
        open(os.path.join(d, "x"), "w").write("x")
        return True
    except OSError:
        return False
print(json.dumps({{
    "root": sorted(os.listdir("/")),
    "secret": os.path.exists({str(secret)!r}),
    "blob": os.path.exists({str(cache / "blobs" / "blob")!r}),
    "ro": can_write({str(ro)!r}), "rw": can_write({str(rw)!r}),
    "mine": can_write({str(cache / "work" / "mine")!r}), "tmp": can_write("/tmp"),
    "usr": can_write("/usr"), "home": os.environ["HOME"],
}}))
"""
    done = _inside(plan, code)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert not seen["secret"] and not seen["blob"]  # the cache shows only what is bound
    assert (seen["ro"], seen["rw"], seen["mine"], seen["tmp"], seen["usr"]) == (
        False, True, True, True, False)
    assert seen["home"] == "/tmp"
    # No /home, /root (beyond an interpreter living there), /var, /run, /mnt, /opt...
    assert set(seen["root"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
                                 "etc", "dev", "proc", "tmp", "root", "work", "home",
                                 "opt"} | {Path(p).parts[1] for p in (sys.prefix, REPO)}
    assert "var" not in seen["root"] and "run" not in seen["root"]


@HAVE_BWRAP
def test_killing_bwrap_ends_everything_in_the_sandbox(tmp_path: Path) -> None:
    """A process that started a session of its own (escaping the process group) still dies
    with the sandbox: its PID namespace ends with its init."""
    read_end, write_end = os.pipe()
    script = "setsid sleep 600 & echo started; wait"
    proc = subprocess.Popen([*command_prefix(SandboxPlan(), {"PATH": "/usr/bin:/bin"}),
                             "/bin/sh", "-c", script], stdout=subprocess.PIPE,
                            pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)  # only the sandbox's processes hold it now
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        proc.kill()  # SIGKILL to bwrap alone
        proc.wait(10)
        # EOF once every holder of the pipe (the setsid'd sleep included) is gone.
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready and os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()


@HAVE_BWRAP
def test_probe_starts_a_sandbox() -> None:
    assert "bubblewrap" in probe()


def _fake_bwrap(tmp_path: Path) -> Path:
    """A ``bwrap`` that fails as it does where user namespaces are off."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    return bin_dir


def test_probe_says_why_there_is_no_sandbox(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(_fake_bwrap(tmp_path)) + ":/usr/bin:/bin")
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        probe()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SandboxUnavailable, match="not on the PATH"):
        probe()


# --------------------------------------------------------------------------- outputs


def test_outputs_are_opened_without_following_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "child"
    (root / "run" / "output" / "sub").mkdir(parents=True)
    (root / "run" / "output" / "ok.txt").write_text("fine")
    secret = tmp_path / "worker-secret.txt"
    secret.write_text("secret")
    (root / "run" / "output" / "link.txt").symlink_to(secret)
    (root / "run" / "output" / "dirlink").symlink_to(tmp_path)
    os.mkfifo(root / "run" / "output" / "fifo")
    with open_output(root, Path("run/output/ok.txt")) as fd:
        assert os.read(fd, 10) == b"fine"
    for rel in ("run/output/link.txt", "run/output/dirlink/worker-secret.txt",
                "run/output/fifo", "run/output/sub", "run/output/../../worker-secret.txt"):
        with pytest.raises(UnsafeOutput):
            with open_output(root, Path(rel)):
                pass
    # The run directory itself swapped for a symlink: refused too.
    (root / "run2").symlink_to(root / "run")
    with pytest.raises(UnsafeOutput):
        with open_output(root, Path("run2/output/ok.txt")):
            pass


# --------------------------------------------------------------------------- operator


def _cli(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command with its ComfyUI checkout in ``tmp_path/comfy`` and a Redis nobody runs."""
    comfy = tmp_path / "comfy"
    comfy.mkdir(exist_ok=True)
    return cli(tmp_path, *args, env={"RUNFLOW_COMFYUI_DIR": str(comfy),
                                     "RUNFLOW_REDIS_URL": "redis://127.0.0.1:1/0", **env})


def _deployed(tmp_path: Path) -> Path:
    from tests.support.factories import workflow

    path = tmp_path / "deployed.json"
    path.write_text(json.dumps(workflow()))
    return path


def test_run_and_serve_refuse_to_start_without_a_working_sandbox(tmp_path: Path) -> None:
    path = str(_fake_bwrap(tmp_path)) + ":/usr/bin:/bin"
    for args in (("run", str(_deployed(tmp_path)), "--input", "prompt=x"),
                 ("serve", "--burst")):
        done = _cli(tmp_path, *args, env={"PATH": path})
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "no working sandbox" in lines[0], done.stderr
        assert "No permissions to create new namespace" in lines[0]
        assert "RUNFLOW_SANDBOX=none" in lines[0]
        assert done.stdout == ""


def test_unsandboxed_run_works_and_says_so(tmp_path: Path) -> None:
    path = str(_fake_bwrap(tmp_path)) + ":/usr/bin:/bin"  # no working bwrap: not needed
    done = _cli(tmp_path, "run", str(_deployed(tmp_path)), "--input", "prompt=x",
                "--out", str(tmp_path / "out"), env={"PATH": path, "RUNFLOW_SANDBOX": "none"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert "RUNFLOW_SANDBOX=none: custom-node code runs unconfined" in done.stderr


def test_doctor_checks_the_sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"cache_dir": tmp_path / "cache", "gpu_class": "cpu"}
    doctor_command(argparse.Namespace(json=True), Settings(**base, sandbox="none"))
    results = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert results["sandbox"]["ok"] and results["sandbox"]["warning"]
    assert "unconfined" in results["sandbox"]["detail"]
    doctor_command(argparse.Namespace(json=False), Settings(**base, sandbox="none"))
    assert "WARN sandbox" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(_fake_bwrap(tmp_path)) + ":/usr/bin:/bin")
    assert doctor_command(argparse.Namespace(json=True), Settings(**base)) == 1
    results = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert not results["sandbox"]["ok"]
    assert "No permissions" in results["sandbox"]["detail"]


@HAVE_BWRAP
def test_doctor_passes_the_sandbox_where_bwrap_works(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    doctor_command(argparse.Namespace(json=True),
                   Settings(cache_dir=tmp_path / "cache", gpu_class="cpu"))
    results = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert results["sandbox"]["ok"] and not results["sandbox"].get("warning")


def test_settings_refuse_unknown_sandbox_values() -> None:
    from runflow_worker.settings import InvalidSettings

    with pytest.raises(InvalidSettings, match="RUNFLOW_SANDBOX"):
        Settings(sandbox="docker")
    with pytest.raises(InvalidSettings, match="RUNFLOW_CHILD_NETWORK"):
        Settings(child_network="bridge")
    assert Settings(sandbox="NONE", child_network="Host").sandbox == "none"


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker`` (the tests run as root or
    as the children's user, so every environ is readable)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(pid))
            except OSError:
                continue
    return found


@HAVE_BWRAP
def test_stopping_the_sandboxed_runner_ends_a_helper_the_child_forked(tmp_path: Path) -> None:
    import threading
    import time
    import uuid

    from runflow_worker.runtime.runner import Runner, RunnerConfig

    root = tmp_path / "root"
    (tmp_path / "comfy").mkdir()
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    cfg = RunnerConfig(comfyui_dir=str(tmp_path / "comfy"), base_dir=str(root / "base"),
                       child_entry=FORKING_CHILD, startup_timeout_s=60,
                       env={"fake_helper_pidfile": str(root / "helper.pid"),
                            "SANDBOX_TEST_MARK": marker},
                       sandbox=SandboxPlan(writable=(str(root),), fresh=(str(root),)))
    runner = Runner(cfg)
    runner.start()
    try:
        assert (root / "helper.pid").exists()  # written before Ready
        assert len(_processes_with(marker)) >= 2  # the child and its helper
    finally:
        runner.stop(timeout_s=0)
    deadline = time.monotonic() + 10
    tick = threading.Event()
    while _processes_with(marker) and time.monotonic() < deadline:
        tick.wait(0.05)
    assert _processes_with(marker) == []


def test_a_blob_hard_link_falls_back_to_a_copy_across_filesystems(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    from runflow_worker.cache.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    blob = store.path_for(digest)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    linked = store.hardlink(digest, tmp_path / "run" / "m.bin", base=tmp_path / "run")
    assert not linked.is_symlink() and linked.stat().st_ino == blob.stat().st_ino
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to link across")
    other = Path(os.path.realpath(shm)) / f"runflow-test-{os.getpid()}"
    try:
        copied = store.hardlink(digest, other / "m.bin", base=other)
        assert not copied.is_symlink() and copied.read_bytes() == data
        assert copied.stat().st_ino != blob.stat().st_ino
        assert any("copying it" in r.getMessage() for r in caplog.records)
    finally:
        import shutil

        shutil.rmtree(other, ignore_errors=True)


def test_a_new_child_finds_its_root_empty_whatever_the_last_one_left(tmp_path: Path) -> None:
    from runflow_worker.runtime.runner import _empty_dir

    root = tmp_path / "child"
    locked = root / "base" / "locked"
    locked.mkdir(parents=True)
    (locked / "planted.py").write_text("left for the next owner's child")
    locked.chmod(0)
    (root / "link").symlink_to(tmp_path)
    _empty_dir(str(root))
    assert root.is_dir() and list(root.iterdir()) == []
    assert not list(tmp_path.glob("child.old-*"))  # removed, unreadable directory and all


def test_emptying_the_child_root_never_changes_what_a_link_there_points_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's link in a directory it made read-only: a worker that is not root cannot
    remove the link at first, and making it removable must not chmod the link's target (a
    file of the worker)."""
    from runflow_worker.runtime.runner import _empty_dir

    victim = tmp_path / "worker-file"
    victim.write_text("the worker's")
    victim.chmod(0o644)
    root = tmp_path / "child"
    (root / "ro").mkdir(parents=True)
    (root / "ro" / "link").symlink_to(victim)
    real_unlink = os.unlink
    refused: list[str] = []

    def unlink(path, *, dir_fd=None):
        if path == "link" and not refused:  # what EACCES looks like to a worker not root
            refused.append(path)
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    _empty_dir(str(root))
    assert refused and list(root.iterdir()) == []
    assert victim.stat().st_mode & 0o777 == 0o644
