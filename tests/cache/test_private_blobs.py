"""Private blobs: another owner's run gets one only once its own source shows the bytes."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.errors import CacheError, FetchTimeout, IntegrityError, SourceUnavailable
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.sources import Sources
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.cache.helpers import partial_files
from tests.support.bodies import make_body, sha256_hex
from tests.support.fixtures import LOOPBACK_ALLOW
from tests.support.https_server import HTTPSServer, Mode
from tests.support.s3_servers import aws_test_credentials, moto_s3

pytestmark = pytest.mark.timeout(60)

BODY = make_body(2 * 2**20 + 3)
DIGEST = sha256_hex(BODY)


class CountingClient:
    """A real S3 client whose reads are counted: ``gets`` (object bodies) and ``heads``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.gets: list[str] = []
        self.heads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_object(self, **request: Any) -> Any:
        self.gets.append(request["Key"])
        return self.client.get_object(**request)

    def head_object(self, **request: Any) -> Any:
        self.heads.append(request["Key"])
        return self.client.head_object(**request)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingClient]:
    aws_test_credentials(monkeypatch)
    with moto_s3("models") as (_url, client):  # a fresh moto state: no other test's objects
        client.put_object(Bucket="models", Key="alice/model", Body=BODY)
        yield CountingClient(client)


@pytest.fixture
def store(s3: CountingClient, tmp_path: Path, fetcher: Fetcher) -> BlobStore:
    return BlobStore(tmp_path / "blobs", sources=Sources(s3_client=lambda: s3, fetcher=fetcher))


def failure_on_a_cold_store(tmp_path: Path, s3: CountingClient, urls: list[str]) -> str:
    """What the same request raises on a store that never held the blob."""
    cold = BlobStore(tmp_path / "cold", sources=Sources(s3_client=lambda: s3))
    with pytest.raises(CacheError) as info:
        cold.ensure(DIGEST, urls, owner="bob")
    return f"{type(info.value).__name__}: {info.value}"


def test_another_owner_whose_source_lacks_the_object_never_gets_the_blob(
        store: BlobStore, s3: CountingClient, tmp_path: Path) -> None:
    assert store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice").read_bytes() == BODY
    assert store.access.describe(DIGEST).owners == 1
    s3.gets.clear()
    for urls in ([], ["s3://models/bob/absent"]):
        with pytest.raises(SourceUnavailable) as info:
            store.ensure(DIGEST, urls, owner="bob")
        # The same failure as on a store without the blob: nothing tells it is here.
        assert f"{type(info.value).__name__}: {info.value}" == failure_on_a_cold_store(
            tmp_path, s3, urls)
        assert not store.usable(DIGEST, "bob") and store.usable(DIGEST, "alice")
    # A source with other bytes is a wrong digest, as a download from it would be.
    s3.put_object(Bucket="models", Key="bob/other", Body=b"other bytes")
    with pytest.raises(IntegrityError):
        store.ensure(DIGEST, ["s3://models/bob/other"], owner="bob")
    # A run without owner is an owner of its own.
    with pytest.raises(SourceUnavailable):
        store.ensure(DIGEST, [], owner=None)
    assert store.access.describe(DIGEST).owners == 1
    assert partial_files(store) == []  # the proofs' reads are gone


def test_another_owner_whose_source_holds_the_bytes_gets_it_after_reading_them(
        store: BlobStore, s3: CountingClient) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    s3.put_object(Bucket="models", Key="bob/copy", Body=BODY)  # no checksum kept by S3
    s3.gets.clear()
    seen: list[tuple[int, int | None]] = []
    path = store.ensure(DIGEST, ["s3://models/bob/copy"], owner="bob",
                        progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == BODY
    assert s3.gets == ["bob/copy"]  # the proof read bob's object in full
    assert seen[-1] == (len(BODY), len(BODY))
    assert store.access.describe(DIGEST).owners == 2
    # Shown once per owner: the next run of bob's is handed the blob at once.
    s3.gets.clear()
    assert store.ensure(DIGEST, ["s3://models/bob/copy"], owner="bob") == path
    assert store.ensure(DIGEST, [], owner="alice") == path
    assert s3.gets == []
    assert partial_files(store) == []


def test_a_whole_object_sha256_kept_by_s3_is_proof_enough(store: BlobStore,
                                                           s3: CountingClient) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    s3.put_object(Bucket="models", Key="bob/checked", Body=BODY, ChecksumAlgorithm="SHA256")
    head = s3.head_object(Bucket="models", Key="bob/checked", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]) == hashlib.sha256(BODY).digest()
    s3.gets.clear()
    assert store.ensure(DIGEST, ["s3://models/bob/checked"], owner="bob").read_bytes() == BODY
    assert s3.gets == []  # S3 vouched for the whole object's sha256
    # A kept checksum of other bytes is refused without reading them either.
    s3.put_object(Bucket="models", Key="carol/other", Body=b"x" * 10,
                  ChecksumAlgorithm="SHA256")
    with pytest.raises(CacheError):
        store.ensure(DIGEST, ["s3://models/carol/other"], owner="carol")
    assert s3.gets == []


def test_public_https_blobs_are_shared_without_a_proof(
        https_server: HTTPSServer, store: BlobStore, s3: CountingClient) -> None:
    body = make_body(100_000, seed=7)
    https_server.add("/public", body)
    digest = sha256_hex(body)
    path = store.ensure(digest, [https_server.url("/public")], owner="alice")
    requests = len(https_server.requests)
    for owner in ("bob", None):
        assert store.ensure(digest, [], owner=owner) == path
    assert len(https_server.requests) == requests  # nobody had to show anything
    assert store.access.describe(digest).public


def test_a_public_source_showing_a_private_blob_makes_it_public(
        https_server: HTTPSServer, store: BlobStore) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    https_server.add("/same", BODY)
    store.ensure(DIGEST, [https_server.url("/same")], owner="bob")
    assert store.access.describe(DIGEST).public  # anyone could have fetched it from there
    assert store.ensure(DIGEST, [], owner="carol").read_bytes() == BODY


def test_a_blob_without_a_record_is_served_to_nobody_unproven(
        https_server: HTTPSServer, store: BlobStore) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    store.access.forget(DIGEST)  # a store from before the records
    assert store.verify().unrecorded == [DIGEST]
    with pytest.raises(SourceUnavailable):
        store.ensure(DIGEST, [], owner="alice")
    https_server.add("/m", BODY)
    store.ensure(DIGEST, [https_server.url("/m")], owner="alice")
    assert store.verify().unrecorded == []


def test_ls_and_gc_handle_the_records(store: BlobStore, https_server: HTTPSServer) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    body = make_body(1000, seed=3)
    https_server.add("/p", body)
    store.ensure(sha256_hex(body), [https_server.url("/p")], owner="alice")
    access = {b.sha256: b.access for b in store.ls()}
    assert access[DIGEST].owners == 1 and not access[DIGEST].public
    assert access[sha256_hex(body)].public
    # A record left behind by a blob gone another way (a crash before publishing).
    orphan = sha256_hex(b"never published")
    store.access.record(orphan, "alice", private=True)
    result = store.gc(0)
    assert sorted(result.evicted) == sorted([DIGEST, sha256_hex(body)])
    assert result.access_records_removed == 1
    assert os.listdir(store.access.directory) == []


def test_mirrors_prove_for_everyone(store: BlobStore, s3: CountingClient,
                                    tmp_path: Path) -> None:
    store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / DIGEST).write_bytes(BODY)
    mirrored = BlobStore(store.root, sources=Sources(s3_client=lambda: s3,
                                                     mirror_dirs=[mirror]))
    # Every run is served from the operator's mirror first anyway.
    assert mirrored.ensure(DIGEST, [], owner="bob").read_bytes() == BODY
    assert mirrored.access.describe(DIGEST).public


def test_https_sources_needing_credentials_are_private(fetcher: Fetcher,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sources = Sources(fetcher=fetcher)
    assert not sources.source_for("https://files.test/m").private  # type: ignore[attr-defined]
    monkeypatch.setattr(fetcher, "sends_credentials",
                        lambda url: url.startswith("https://files.test/"), raising=False)
    assert sources.source_for("https://files.test/m").private  # type: ignore[attr-defined]
    assert not sources.source_for("https://other.test/m").private  # type: ignore[attr-defined]


def test_a_private_source_finishing_an_earlier_download_proves_the_whole_blob(
        store: BlobStore, s3: CountingClient) -> None:
    # Another owner's download was cut off: its first bytes are in an orphaned partial.
    orphan = store.partials.directory / f"{DIGEST}.host.1.deadbeef.part"
    orphan.write_bytes(BODY[:1_000_000])
    assert store.ensure(DIGEST, ["s3://models/alice/model"], owner="alice").read_bytes() == BODY
    # The resume read only the tail; alice's object was then read in full as the proof.
    assert s3.gets == ["alice/model", "alice/model"]
    assert store.access.describe(DIGEST).owners == 1 and store.usable(DIGEST, "alice")
    assert partial_files(store) == []


def test_a_public_source_never_finishes_another_owners_private_download(
        tmp_path: Path, https_server: HTTPSServer, ca_bundle: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice's download from a source needing credentials was cut off half-way. Bob's public
    URL must show every byte itself: had it only sent the rest (a ``Range`` resume of
    alice's partial), the blob would be public with its first half never shown by any
    public source, and bob handed alice's bytes for knowing the tail."""
    https_server.add("/alice", BODY, mode=Mode.STALL, cut_at=1_000_000)
    https_server.add("/bob", BODY)
    fetcher = Fetcher(URLPolicy(LOOPBACK_ALLOW), ca_bundle=ca_bundle, timeout_s=0.5)
    monkeypatch.setattr(fetcher, "sends_credentials", lambda url: url.endswith("/alice"),
                        raising=False)
    store = BlobStore(tmp_path / "blobs", sources=Sources(fetcher=fetcher))
    with pytest.raises(FetchTimeout):  # the server went quiet: a resumable cut
        store.ensure(DIGEST, [https_server.url("/alice")], owner="alice")
    https_server.routes["/alice"].release()
    assert store.ensure(DIGEST, [https_server.url("/bob")], owner="bob").read_bytes() == BODY
    assert https_server.routes["/bob"].range_headers in ([None], ["bytes=0-"])
