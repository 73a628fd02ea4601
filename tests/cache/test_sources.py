"""Sources: S3 (moto server on loopback), runflow assets, local mirrors, file URLs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.errors import IntegrityError, SourceUnavailable, URLRefused
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.sources import S3Source, Sources
from tests.cache.helpers import partial_files
from tests.support.bodies import make_body, sha256_hex

pytestmark = pytest.mark.timeout(60)

BODY = make_body(3 * 2**20 + 5)
DIGEST = sha256_hex(BODY)


@pytest.fixture
def s3_client(moto_s3: str) -> Callable[[], object]:
    def make() -> object:
        return boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")

    client = make()
    client.create_bucket(Bucket="models")  # type: ignore[attr-defined]
    client.create_bucket(Bucket="runflow-assets")  # type: ignore[attr-defined]
    return make


def test_s3_source(s3_client: Callable[[], object], tmp_path: Path) -> None:
    s3_client().put_object(Bucket="models", Key="sd/v1.safetensors", Body=BODY)  # type: ignore[attr-defined]
    store = BlobStore(tmp_path / "blobs", sources=Sources(s3_client=s3_client))
    seen: list[tuple[int, int | None]] = []
    path = store.ensure(DIGEST, ["s3://models/sd/v1.safetensors"],
                        progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == BODY
    assert seen[-1] == (len(BODY), len(BODY))
    assert partial_files(store) == []


def test_s3_resume_from_a_partial(s3_client: Callable[[], object], tmp_path: Path) -> None:
    s3_client().put_object(Bucket="models", Key="m", Body=BODY)  # type: ignore[attr-defined]
    store = BlobStore(tmp_path / "blobs", sources=Sources(s3_client=s3_client))
    orphan = store.partials.directory / f"{DIGEST}.host.1.deadbeef.part"
    orphan.write_bytes(BODY[:1_000_000])
    assert store.ensure(DIGEST, ["s3://models/m"]).read_bytes() == BODY


class RecordingClient:
    """A real S3 client whose ranged GETs are recorded, and answered by ``answer_range``."""

    def __init__(self, client: object, answer_range: bool = True) -> None:
        self.client = client
        self.answer_range = answer_range
        self.ranges: list[str | None] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    def get_object(self, **request: object) -> dict:
        self.ranges.append(request.get("Range"))  # type: ignore[arg-type]
        if "Range" in request and not self.answer_range:
            # A store answering a resume with the whole object under a range of the wrong
            # offset: appending it would corrupt the file.
            whole = self.client.get_object(Bucket=request["Bucket"], Key=request["Key"])  # type: ignore[attr-defined]
            whole["ContentRange"] = f"bytes 0-{len(BODY) - 1}/{len(BODY)}"
            return whole
        return self.client.get_object(**request)  # type: ignore[attr-defined]


def test_s3_resume_answered_for_another_offset_restarts(s3_client: Callable[[], object],
                                                        tmp_path: Path) -> None:
    s3_client().put_object(Bucket="models", Key="m", Body=BODY)  # type: ignore[attr-defined]
    client = RecordingClient(s3_client(), answer_range=False)
    dest = tmp_path / "m.part"
    dest.write_bytes(BODY[:1_000_000])
    result = S3Source("models", "m", lambda: client).fetch(dest, start_offset=1_000_000)
    assert dest.read_bytes() == BODY and result.sha256 == DIGEST  # no splice
    assert client.ranges == ["bytes=1000000-", None]  # the whole object again instead


class _CutBody:
    """A streaming body that breaks after ``cut`` bytes, as a dropped connection does."""

    def __init__(self, body: object, cut: int) -> None:
        self.body, self.cut = body, cut

    def iter_chunks(self, size: int):
        from botocore.exceptions import ResponseStreamingError

        sent = 0
        for chunk in self.body.iter_chunks(size):  # type: ignore[attr-defined]
            if sent + len(chunk) > self.cut:
                yield chunk[: self.cut - sent]
                raise ResponseStreamingError(error="connection reset")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.body.close()  # type: ignore[attr-defined]


def test_s3_object_replaced_between_a_cut_and_the_resume_is_not_spliced(
        s3_client: Callable[[], object], tmp_path: Path) -> None:
    s3 = s3_client()
    s3.put_object(Bucket="models", Key="m", Body=BODY)  # type: ignore[attr-defined]
    new = bytes(reversed(BODY))
    client = RecordingClient(s3)
    real_get = client.get_object

    def first_cut_then_replaced(**request: object) -> dict:
        response = real_get(**request)
        if len(client.ranges) == 1:  # the first answer breaks; the object is replaced
            response["Body"] = _CutBody(response["Body"], 1_000_000)
            s3.put_object(Bucket="models", Key="m", Body=new)  # type: ignore[attr-defined]
        return response

    client.get_object = first_cut_then_replaced  # type: ignore[method-assign]
    dest = tmp_path / "input.bin"
    result = S3Source("models", "m", lambda: client).fetch(dest)
    assert dest.read_bytes() == new and result.size == len(new)
    assert client.ranges == [None, "bytes=1000000-", None]  # refused resume, then anew


def test_s3_complete_orphan_is_verified_not_downloaded_again(s3_client: Callable[[], object],
                                                             tmp_path: Path) -> None:
    s3_client().put_object(Bucket="models", Key="m", Body=BODY)  # type: ignore[attr-defined]
    client = RecordingClient(s3_client())
    store = BlobStore(tmp_path / "blobs", sources=Sources(s3_client=lambda: client))
    orphan = store.partials.directory / f"{DIGEST}.host.1.deadbeef.part"
    orphan.write_bytes(BODY)  # every byte: its writer died before publishing
    assert store.ensure(DIGEST, ["s3://models/m"]).read_bytes() == BODY
    # The download asks for nothing past the end. Whose bytes the orphan held is unknown, and
    # the object showed only its size: being private, it then shows them in full (a proof).
    assert client.ranges == [f"bytes={len(BODY)}-", None]


def test_s3_missing_object_and_wrong_content(s3_client: Callable[[], object], tmp_path: Path) -> None:
    s3_client().put_object(Bucket="models", Key="other", Body=b"not it")  # type: ignore[attr-defined]
    store = BlobStore(tmp_path / "blobs", sources=Sources(s3_client=s3_client))
    with pytest.raises(SourceUnavailable) as info:
        store.ensure(DIGEST, ["s3://models/absent"])
    assert info.value.reason == "not_found"
    with pytest.raises(IntegrityError):
        store.ensure(DIGEST, ["s3://models/other"])
    assert store.ls() == [] and partial_files(store) == []


def test_runflow_asset(s3_client: Callable[[], object], tmp_path: Path) -> None:
    asset = uuid.uuid4()
    s3_client().put_object(Bucket="runflow-assets", Key=f"assets/{asset}", Body=BODY)  # type: ignore[attr-defined]
    sources = Sources(s3_client=s3_client, asset_bucket="runflow-assets")
    store = BlobStore(tmp_path / "blobs", sources=sources)
    assert store.ensure(DIGEST, [f"runflow://assets/{asset}"]).read_bytes() == BODY
    assert sources.source_for(f"runflow://assets/{str(asset).upper()}").label == (
        f"runflow://assets/{asset}"
    )


@pytest.mark.parametrize("url", ["runflow://assets/not-a-uuid", "runflow://assets/../secrets",
                                 "runflow://other/123e4567-e89b-12d3-a456-426614174000",
                                 "runflow://assets/123e4567-e89b-12d3-a456-426614174000/x"])
def test_bad_asset_urls(url: str) -> None:
    with pytest.raises(URLRefused):
        Sources(asset_bucket="b").source_for(url)


def test_asset_without_bucket() -> None:
    with pytest.raises(SourceUnavailable):
        Sources().source_for(f"runflow://assets/{uuid.uuid4()}")


def test_mirror_directory_serves_offline(tmp_path: Path, no_connections: list[object]) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / DIGEST).write_bytes(BODY)
    store = BlobStore(tmp_path / "blobs", sources=Sources(mirror_dirs=[tmp_path / "none", flat]))
    assert store.ensure(DIGEST, ["https://unreachable.example/m"]).read_bytes() == BODY
    assert no_connections == []
    # Another store's layout works as a mirror too.
    other = BlobStore(tmp_path / "blobs2", sources=Sources(mirror_dirs=[store.root]))
    assert other.ensure(DIGEST).read_bytes() == BODY


def test_corrupt_mirror_falls_back_to_the_url(
    tmp_path: Path, https_server: object, fetcher: Fetcher
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / DIGEST).write_bytes(b"corrupted mirror copy")
    https_server.add("/m", BODY)  # type: ignore[attr-defined]
    store = BlobStore(tmp_path / "blobs", sources=Sources(fetcher=fetcher, mirror_dirs=[mirror]))
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY  # type: ignore[attr-defined]


def test_file_urls_only_when_allowed(tmp_path: Path) -> None:
    src = tmp_path / "model file.bin"
    src.write_bytes(BODY)
    url = src.as_uri()
    with pytest.raises(URLRefused):
        BlobStore(tmp_path / "a", sources=Sources()).ensure(DIGEST, [url])
    store = BlobStore(tmp_path / "b", sources=Sources(allow_file_urls=True))
    assert store.ensure(DIGEST, [url]).read_bytes() == BODY


def test_s3_can_be_disabled() -> None:
    with pytest.raises(URLRefused):
        Sources(allow_s3=False).source_for("s3://bucket/key")
    with pytest.raises(URLRefused):
        Sources().source_for("s3://bucket")
