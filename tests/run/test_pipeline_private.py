"""A run is handed another owner's private model only once its own source shows the bytes
(S3 on a local moto server, the real blob store, a fake ComfyUI child)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from runflow_worker.errors import ErrorCode
from runflow_worker.run.assembly import build_pipeline
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline
from runflow_worker.run.storage import LocalStorage
from runflow_worker.settings import Settings
from tests.fakes import FAKE_CHILD
from tests.fakes.control import RecordingControl
from tests.support.bodies import make_body, sha256_hex
from tests.support.factories import message, workflow
from tests.support.s3_servers import aws_test_credentials, moto_s3

pytestmark = pytest.mark.timeout(60)

BODY = make_body(300_000, seed=5)
DIGEST = sha256_hex(BODY)
GRAPH = {"1": {"class_type": "FakeSave", "inputs": {"text": "model:ckpt.safetensors",
                                                    "output_id": "copy"}}}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    aws_test_credentials(monkeypatch)
    with moto_s3("models") as (url, client):
        client.put_object(Bucket="models", Key="acme/model", Body=BODY)
        yield url, client


def make_pipeline(root: Path, endpoint: str) -> Pipeline:
    settings = Settings(cache_dir=root / "cache", comfyui_dir=root, gpu_class="cpu",
                        s3_endpoint_url=endpoint, runner_entry=FAKE_CHILD)
    return build_pipeline(settings, storage=LocalStorage(root / "store"))


def run(pipeline: Pipeline, owner: str, url: str, run_id: str):
    wf = workflow(GRAPH, owner=owner,
                  models={"ckpt.safetensors": {"sha256": DIGEST, "url": url}})
    return pipeline.execute(parse_message(message(wf=wf, run_id=run_id, input={})),
                            RecordingControl())


def test_a_private_model_reaches_another_owner_only_through_its_own_source(
        s3: tuple[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    endpoint, client = s3
    pipeline = make_pipeline(tmp_path / "warm", endpoint)
    cold = make_pipeline(tmp_path / "cold", endpoint)
    try:
        first = run(pipeline, "acme", "s3://models/acme/model", "p-1")
        assert first.status is RunStatus.SUCCEEDED, first.failure

        refused = run(pipeline, "globex", "s3://models/globex/absent", "p-2")
        assert refused.status is RunStatus.FAILED
        assert refused.failure.code is ErrorCode.MODEL_FETCH_FAILED
        assert refused.failure.details["fields"] == ["workflow.models.ckpt.safetensors"]
        # Word for word what a worker without the blob answers.
        never_had = run(cold, "globex", "s3://models/globex/absent", "p-2")
        assert refused.failure.message == never_had.failure.message
        assert refused.failure.details == never_had.failure.details

        client.put_object(Bucket="models", Key="globex/model", Body=BODY)
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            shown = run(pipeline, "globex", "s3://models/globex/model", "p-3")
        assert shown.status is RunStatus.SUCCEEDED, shown.failure
        (entry,) = shown.output.outputs  # the child read the model it was handed
        assert Path(unquote(urlsplit(entry.url).path)).read_bytes() == BODY
        assert "GET /models/globex/model" in caplog.text  # its source was read
        assert pipeline.blobs.access.describe(DIGEST).owners == 2  # type: ignore[attr-defined]
    finally:
        pipeline.close()
        cold.close()
