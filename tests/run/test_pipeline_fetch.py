"""Inputs and models over https through the SSRF-safe fetcher (local TLS server, fake child)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import trustme
from PIL import Image

from runflow_worker.errors import ErrorCode
from runflow_worker.run.assembly import build_pipeline
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.storage import LocalStorage
from runflow_worker.settings import Settings
from tests.fakes import FAKE_CHILD
from tests.fakes.control import RecordingControl
from tests.support.factories import message, workflow
from tests.support.https_server import HTTPSServer, Mode

GRAPH = {
    "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
    "2": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
    "3": {"class_type": "FakeSave", "inputs": {"text": ["2", 0], "read": True,
                                               "output_id": "doc"}},
    "4": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "read": True,
                                               "output_id": "img"}},
}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fetch")
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with HTTPSServer(ca=ca) as server:
        settings = Settings(cache_dir=root / "cache", comfyui_dir=root, gpu_class="cpu",
                            url_allow=("127.0.0.1/32",), ca_bundle=ca_file,
                            runner_entry=FAKE_CHILD)
        pipeline = build_pipeline(settings, storage=LocalStorage(root / "store"))
        yield server, pipeline
        pipeline.close()


def run(pipeline, msg: dict):
    control = RecordingControl()
    return pipeline.execute(parse_message(msg), control), control


def test_https_image_and_file_inputs(env) -> None:
    server, pipeline = env
    server.add("/in/photo.png", png())
    server.add("/in/doc.txt", b"remote text")
    result, _ = run(pipeline, message(GRAPH, input={
        "image": server.url("/in/photo.png"), "doc": server.url("/in/doc.txt")}))
    assert result.status is RunStatus.SUCCEEDED, result.failure
    texts = {e.output_id: Path(unquote(urlsplit(e.url).path)).read_bytes()
             for e in result.output.outputs}
    assert texts["doc"] == b"remote text"
    assert texts["img"] == png()


def test_a_warm_runs_new_folders_come_from_the_reserve(env) -> None:
    server, pipeline = env
    server.add("/in/photo.png", png())
    server.add("/in/doc.txt", b"remote text")
    msg = message(GRAPH, input={"image": server.url("/in/photo.png"),
                                "doc": server.url("/in/doc.txt")})
    run(pipeline, msg)  # the first run: the reserve is filled after it
    pipeline._run_dirs.quiesce()
    reserve = pipeline._run_dirs.reserve
    before, files_before = reserve.taken, reserve.files_taken
    result, _ = run(pipeline, {**msg, "run_id": "reserve-2"})
    assert result.status is RunStatus.SUCCEEDED, result.failure
    # Each input's <content>/ in runflow_inputs/ (which comes with the run's spare folders),
    # and the outputs' runs/<run_id>/ with its two <output_id>/: five folders, none made by
    # mkdir; the two files fetched into and the two stored copies, none created on the
    # run's path either.
    assert reserve.taken - before == 5
    assert reserve.files_taken - files_before == 4


def test_https_non_image_is_invalid_input(env) -> None:
    server, pipeline = env
    server.add("/in/fake.png", b"<html>not an image</html>")
    server.add("/in/doc2.txt", b"x")
    result, _ = run(pipeline, message(GRAPH, input={
        "image": server.url("/in/fake.png"), "doc": server.url("/in/doc2.txt")}))
    assert result.failure.code is ErrorCode.INVALID_INPUT
    assert "input.image" in result.failure.message


@pytest.mark.parametrize(("path", "mode"), [("/missing", None), ("/err", Mode.STATUS)])
def test_unfetchable_input_is_input_fetch_failed(env, path: str, mode) -> None:
    server, pipeline = env
    if mode is not None:
        server.add(path, b"nope", mode=mode, status=500)
    server.add("/in/doc3.txt", b"x")
    result, _ = run(pipeline, message(GRAPH, input={
        "image": server.url(path), "doc": server.url("/in/doc3.txt")}))
    assert result.failure.code is ErrorCode.INPUT_FETCH_FAILED


def test_private_address_refused(env) -> None:
    server, pipeline = env
    server.add("/in/doc4.txt", b"x")
    result, _ = run(pipeline, message(GRAPH, input={
        "image": "https://10.0.0.1/a.png", "doc": server.url("/in/doc4.txt")}))
    assert result.failure.code is ErrorCode.INPUT_FETCH_FAILED
    assert "10.0.0.1" in result.failure.message


def test_model_downloaded_verified_and_linked(env) -> None:
    server, pipeline = env
    body = b"weights" * 1000
    digest = hashlib.sha256(body).hexdigest()
    server.add("/models/m.safetensors", body)
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
             "2": {"class_type": "FakeSave", "inputs": {
                 "text": "model:checkpoints/m.safetensors", "output_id": "m"}}}
    wf = workflow(graph, models={"checkpoints/m.safetensors": {
        "sha256": digest, "url": server.url("/models/m.safetensors")}})
    result, control = run(pipeline, message(wf=wf))
    assert result.status is RunStatus.SUCCEEDED, result.failure
    out = Path(unquote(urlsplit(result.output.outputs[0].url).path))
    assert out.read_bytes() == body
    assert any(d.get("phase") == "models" for _, d in control.events)
    # A second run with another URL for the same digest never fetches again.
    wf["models"]["checkpoints/m.safetensors"]["url"] = server.url("/models/gone")
    again, _ = run(pipeline, message(wf=wf, run_id="again"))
    assert again.status is RunStatus.SUCCEEDED, again.failure


def test_model_with_wrong_digest_fails(env) -> None:
    server, pipeline = env
    server.add("/models/bad.bin", b"corrupt")
    wf = workflow(models={"checkpoints/bad.bin": {
        "sha256": "cd" * 32, "url": server.url("/models/bad.bin")}})
    result, _ = run(pipeline, message(wf=wf))
    assert result.failure.code is ErrorCode.MODEL_FETCH_FAILED
    assert result.failure.details["fields"] == ["workflow.models.checkpoints/bad.bin"]
