"""Hostile custom nodes against the sandboxed ComfyUI child (SPEC section 9), fake child.

Each test installs a hostile pack (``tests/fakes/hostile_pack.py``) in the ComfyUI
checkout's ``custom_nodes/`` and runs one of its nodes; the node reports what it reached,
and the test checks both the report and the disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline
from runflow_worker.run.storage import LocalStorage
from tests.fakes import FAKE_CHILD
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import copy_fetch
from tests.support.factories import message, workflow
from tests.support.paths import REPO
from tests.support.pipelines import make_pipeline

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
]

MARK = "RUNFLOW" + "CANARY"  # never spelled out whole in a file the node can read


def _comfy(root: Path, *packs: str) -> Path:
    """A ComfyUI checkout (for the fake child) holding ``packs`` (files of tests/fakes)."""
    comfy = root / "comfy"
    for pack in packs:
        (comfy / "custom_nodes" / pack).mkdir(parents=True)
        shutil.copyfile(REPO / "tests" / "fakes" / f"{pack}.py",
                        comfy / "custom_nodes" / pack / "__init__.py")
    return comfy


def _pipeline(root: Path, comfy: Path, **overrides: Any) -> Pipeline:
    """A sandboxed pipeline on ``comfy`` whose cache volume (``root/cache``) is hidden from
    the child; it may read the tests (the fake child's code)."""
    cache = root / "cache"
    options = {"sandbox_hidden": (cache,), "sandbox_read_only": (REPO / "tests",),
               **overrides}
    return make_pipeline(root, work_dir=cache / "work", comfyui_dir=comfy,
                         allow_local_files=True, storage=LocalStorage(cache / "outputs"),
                         blobs=BlobStore(cache / "blobs"), fetch_input=copy_fetch, **options)


def _run(pl: Pipeline, node: str, run_id: str, **inputs: Any) -> dict[str, Any]:
    """Run the hostile ``node``; its JSON report."""
    graph = {"1": {"class_type": node, "inputs": {"output_id": "report", **inputs}}}
    msg = message(graph, run_id=run_id, input={}, wf=workflow(graph, **_models(pl)))
    result = pl.execute(parse_message(msg), RecordingControl())
    assert result.status is RunStatus.SUCCEEDED, result.failure
    (entry,) = result.output.outputs
    return json.loads(Path(unquote(urlsplit(entry.url).path)).read_text())


def _models(pl: Pipeline) -> dict[str, Any]:
    digest = getattr(pl, "_test_blob", None)
    if digest is None:
        return {}
    return {"models": {"m.bin": {"sha256": digest, "url": "https://models.invalid/m.bin"}}}


def _put_blob(pl: Pipeline, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    store = pl.blobs
    path = store.path_for(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store.access.record(digest, None, private=False)  # as a public download leaves it
    pl._test_blob = digest  # every run of this pipeline declares it as model m.bin
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- secrets


def test_secret_hunt_finds_no_credential(tmp_path: Path) -> None:
    """A worker process started with canary credentials; the node searches its environment,
    every /proc/*/environ and cmdline, and the files under /, /root, $HOME, /var/run/secrets."""
    comfy = _comfy(tmp_path, "hostile_pack")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key={MARK}h\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "worker-state.json").write_text(json.dumps({"token": MARK + "state"}))
    webhook = "whsec_" + MARK + "0123456789abcdefghi"  # 32 base64 characters
    base64.b64decode(webhook.removeprefix("whsec_"))
    graph = {"1": {"class_type": "HostileHunt", "inputs": {"output_id": "report"}}}
    deployed = tmp_path / "deployed.json"
    deployed.write_text(json.dumps(workflow(graph)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RUNFLOW_", "AWS_"))}
    env.update({
        "HOME": str(home), "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": MARK + "AKIA", "AWS_SECRET_ACCESS_KEY": MARK + "secret",
        "RUNFLOW_WEBHOOK_SECRET": webhook,
        "RUNFLOW_REDIS_URL": f"redis://:{MARK}pw@127.0.0.1:6390/0",
        "RUNFLOW_CACHE_DIR": str(cache), "RUNFLOW_COMFYUI_DIR": str(comfy),
        "RUNFLOW_GPU_CLASS": "cpu", "RUNFLOW_RUNNER_ENTRY": FAKE_CHILD,
    })
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "runflow_worker.cli.main", "run", str(deployed),
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=150, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout)["output"]["outputs"]
    report = json.loads(Path(unquote(urlsplit(entry["url"]).path)).read_text())
    assert report["scanned"] > 0  # it did look
    assert report["found"] == []


# --------------------------------------------------------------------------- tamper


def test_tamper_changes_nothing_outside_the_run(tmp_path: Path) -> None:
    """Another environment's custom node, the blob store (directly and through the run's
    own model link), the git mirrors and the image's site-packages stay as they were."""
    comfy = _comfy(tmp_path, "hostile_pack")
    pl = _pipeline(tmp_path, comfy)
    cache = tmp_path / "cache"
    other_node = cache / "envs" / ("0" * 16) / "ComfyUI" / "custom_nodes" / "victim" / "__init__.py"
    other_node.parent.mkdir(parents=True)
    other_node.write_text("NODE_CLASS_MAPPINGS = {}\n")
    mirror_head = cache / "git" / "github.com_x_y.git" / "HEAD"
    mirror_head.parent.mkdir(parents=True)
    mirror_head.write_text("ref: refs/heads/main\n")
    blob = _put_blob(pl, b"model weights")
    site = Path(sysconfig.get_paths()["purelib"])
    watched = [other_node, mirror_head, blob]
    before = {p: (_sha(p), p.stat().st_mode) for p in watched}
    probes = [site / "runflow_tamper_probe.py", other_node.parent / "runflow_tamper_probe.py",
              blob.parent / "runflow_tamper_probe.py"]
    try:
        report = _run(pl, "HostileTamper", "tamper-1",
                      targets=json.dumps([str(p) for p in watched] + ["{models_dir}/m.bin"]),
                      create_in=json.dumps([str(p.parent) for p in probes]))
    finally:
        pl.close()
        made = [p for p in probes if p.exists()]
        for p in made:
            p.unlink()
    assert made == []
    assert {p: (_sha(p), p.stat().st_mode) for p in watched} == before
    assert report["done"] == []


# --------------------------------------------------------------------------- neighbour


def test_the_previous_runs_files_are_not_readable(tmp_path: Path) -> None:
    comfy = _comfy(tmp_path, "hostile_pack")
    pl = _pipeline(tmp_path, comfy)
    doc = tmp_path / "doc.txt"
    doc.write_text(MARK + "neighbour")
    try:
        graph = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
                 "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "read": True,
                                                             "output_id": "copy"}},
                 "3": {"class_type": "HostileStatus", "inputs": {"output_id": "where"}}}
        wf = workflow(graph, inputs=[{"input_id": "doc", "type": "FILE"}])
        first = pl.execute(parse_message(message(run_id="first", wf=wf,
                                                 input={"doc": doc.as_uri()})), RecordingControl())
        assert first.status is RunStatus.SUCCEEDED, first.failure
        stored = {e.output_id: Path(unquote(urlsplit(e.url).path))
                  for e in first.output.outputs}
        assert stored["copy"].read_text() == MARK + "neighbour"
        job = json.loads(stored["where"].read_text())["job"]
        paths = [job["input_dir"], job["output_dir"], str(stored["copy"]),
                 str(stored["copy"].parent), str(tmp_path / "cache" / "outputs")]
        for d in (job["input_dir"], job["output_dir"]):
            paths += [os.path.join(d, name) for name in ("doc.txt", "copy_00001_.txt")]
        report = _run(pl, "HostileRead", "second", paths=json.dumps(paths))
    finally:
        pl.close()
    assert report["seen"] == {}


# --------------------------------------------------------------------------- network


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[list[int]]:
    """A redis-server and a plain TCP listener on loopback: their ports."""
    from tests.support.redis_server import RedisServer

    (tmp_path / "redis").mkdir()
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello from the worker's loopback")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield [redis_server.port, sock.getsockname()[1]]
    finally:
        stop.set()
        sock.close()
        redis_server.stop()


def test_network_is_closed_by_default_and_open_with_host(tmp_path: Path,
                                                         listeners: list[int]) -> None:
    comfy = _comfy(tmp_path, "hostile_pack")
    closed = _pipeline(tmp_path / "closed", comfy)
    try:
        report = _run(closed, "HostileNet", "net-1", ports=json.dumps(listeners))
    finally:
        closed.close()
    assert report["reached"] == {}
    opened = _pipeline(tmp_path / "open", comfy, child_network=True)
    try:
        report = _run(opened, "HostileNet", "net-2", ports=json.dumps(listeners))
    finally:
        opened.close()
    redis_port, plain_port = (str(p) for p in listeners)
    assert report["reached"][redis_port].startswith("+PONG")
    assert report["reached"][plain_port].startswith("hello")


# --------------------------------------------------------------------------- scratch layer


def test_a_pack_writing_into_its_folder_imports_and_the_write_is_gone(tmp_path: Path) -> None:
    comfy = _comfy(tmp_path, "self_writing_pack")
    written = comfy / "custom_nodes" / "self_writing_pack" / "written_at_import.txt"
    pl = _pipeline(tmp_path, comfy)
    try:
        graph = {"1": {"class_type": "SelfWriter", "inputs": {"output_id": "text"}}}
        result = pl.execute(parse_message(message(graph, run_id="writer", input={})),
                            RecordingControl())
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert pl.supervisor.runner.ready.import_failures == ()
        (entry,) = result.output.outputs
        assert Path(unquote(urlsplit(entry.url).path)).read_text() == "written at import"
    finally:
        pl.close()
    assert not written.exists()


def test_an_output_symlinked_to_the_workers_file_is_refused(tmp_path: Path) -> None:
    comfy = _comfy(tmp_path, "hostile_pack")
    secret = tmp_path / "worker-secret.txt"
    secret.write_text(MARK + "worker")
    pl = _pipeline(tmp_path, comfy)
    try:
        graph = {"1": {"class_type": "HostileOutputLink",
                       "inputs": {"output_id": "loot", "target": str(secret)}}}
        result = pl.execute(parse_message(message(graph, run_id="loot", input={})),
                            RecordingControl())
    finally:
        pl.close()
    assert result.status is RunStatus.FAILED
    assert result.failure.code.value == "NODE_ERROR" and "not a regular file" in str(
        result.failure)
    stored = tmp_path / "cache" / "outputs"
    assert not any(MARK.encode() in p.read_bytes() for p in stored.rglob("*") if p.is_file())


@pytest.mark.timeout(120)
def test_a_child_started_before_any_run_sees_the_first_runs_models(tmp_path: Path) -> None:
    """``serve`` starts the child before its first run (``Pipeline.prestart``), when no run
    has made the directories the child's sandbox binds yet: the run's models must still be
    visible to it, read-only."""
    pl = _pipeline(tmp_path, _comfy(tmp_path, "hostile_pack"))
    try:
        _put_blob(pl, b"model weights")
        starting = pl.prestart()
        assert starting is not None and starting.result(timeout=60) is True
        report = _run(pl, "HostileRead", "after-prestart", model_keys=json.dumps(["m.bin"]))
        assert report["models"] == {"m.bin": "model weights"}
    finally:
        pl.close()
