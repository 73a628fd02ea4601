"""BlobStore in one process: publish, integrity, resume, hits, eviction, pins, links, verify."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runflow_worker.cache.blobs import BlobRequest, BlobStore
from runflow_worker.cache.errors import (
    BlobNotFound,
    FetchCanceled,
    HTTPStatusError,
    InsufficientDisk,
    IntegrityError,
    SourceUnavailable,
    UnsafePath,
)
from tests.cache.helpers import partial_files
from tests.support.bodies import make_body, sha256_hex
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(60)

StoreFactory = Callable[..., BlobStore]
BODY = make_body(2 * 2**20 + 7)
DIGEST = sha256_hex(BODY)


def test_ensure_publishes_a_read_only_blob(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    path = store.ensure(DIGEST, [https_server.url("/m")])
    assert path == store.root / "sha256" / DIGEST[:2] / DIGEST
    assert path.read_bytes() == BODY
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert partial_files(store) == []
    assert store.stats.misses == 1 and store.stats.downloaded_bytes == len(BODY)


def test_present_digest_is_never_fetched_again(
    https_server: HTTPSServer, make_store: StoreFactory
) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    store.ensure(DIGEST.upper(), [https_server.url("/m")])
    for url in (https_server.url("/m"), https_server.url("/other"), "https://unreachable.example/"):
        assert store.ensure(DIGEST, [url]).read_bytes() == BODY
    assert https_server.routes["/m"].hits == 1
    assert store.stats.hits == 3


def test_corrupt_content_is_never_published(
    https_server: HTTPSServer, make_store: StoreFactory
) -> None:
    https_server.add("/bad", BODY[:-1] + b"X")
    store = make_store()
    with pytest.raises(IntegrityError) as info:
        store.ensure(DIGEST, [https_server.url("/bad")])
    assert info.value.reason == "integrity"
    assert not store.has(DIGEST)
    assert partial_files(store) == []
    assert store.ls() == []


def test_sources_are_tried_in_order(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/bad", b"wrong content")
    https_server.add("/missing", b"", mode=Mode.STATUS, status=404)
    https_server.add("/good", BODY)
    store = make_store()
    urls = ["http://insecure.example/m", https_server.url("/missing"), https_server.url("/bad"),
            https_server.url("/good")]
    assert store.ensure(DIGEST, urls).read_bytes() == BODY


def test_all_sources_failing(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/missing", b"", mode=Mode.STATUS, status=404)
    store = make_store()
    with pytest.raises(HTTPStatusError):
        store.ensure(DIGEST, [https_server.url("/missing")])
    with pytest.raises(SourceUnavailable) as info:
        store.ensure(DIGEST, [https_server.url("/missing"), "gopher://x/"])
    assert "HTTPStatusError" in str(info.value) and "URLRefused" in str(info.value)
    with pytest.raises(SourceUnavailable):
        store.ensure(DIGEST, [])


def test_cut_download_resumes(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    route = https_server.add("/m", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=1_500_000)
    store = make_store()
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY
    assert route.range_headers[0] is None and route.range_headers[1].startswith("bytes=")
    assert partial_files(store) == []


def test_range_ignoring_server_restarts(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/m", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=1_500_000, ignore_range=True)
    store = make_store()
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY


def test_canceled_download_leaves_a_resumable_partial(
    https_server: HTTPSServer, make_store: StoreFactory
) -> None:
    route = https_server.add("/m", BODY, mode=Mode.STALL, cut_at=1_200_000)
    store = make_store()
    cancel = threading.Event()
    # Cancel once the server has gone quiet mid-body: the fetch is then blocked in a read.
    canceler = threading.Thread(target=lambda: route.stalled.wait(30) and cancel.set())
    canceler.start()
    with pytest.raises(FetchCanceled):
        store.ensure(DIGEST, [https_server.url("/m")], cancel=cancel.is_set)
    canceler.join()
    assert not store.has(DIGEST)
    [leftover] = partial_files(store)
    kept = (store.partials.directory / leftover).stat().st_size
    route.release()
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY
    if kept:
        assert route.range_headers[-1] == f"bytes={kept}-"
    assert partial_files(store) == []


def test_progress_and_size(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    seen: list[tuple[int, int | None]] = []
    store.ensure(DIGEST, [https_server.url("/m")], size=len(BODY),
                 progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(BODY), len(BODY))
    seen.clear()
    store.ensure(DIGEST, [], progress=lambda d, t: seen.append((d, t)))  # a hit reports too
    assert seen == [(len(BODY), len(BODY))]


def test_ensure_many_in_parallel(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    bodies = [make_body(300_000 + i, seed=i) for i in range(5)]
    for i, body in enumerate(bodies):
        https_server.add(f"/m{i}", body)
    store = make_store()
    final: dict[str, tuple[int, int | None]] = {}
    lock = threading.Lock()

    def progress(sha: str, done: int, total: int | None) -> None:
        with lock:
            final[sha] = (done, total)

    requests = [BlobRequest(sha256_hex(b), [https_server.url(f"/m{i}")]) for i, b in enumerate(bodies)]
    paths = store.ensure_many(requests + [(requests[0].sha256, [])], max_parallel=3,
                              progress=progress)
    assert set(paths) == {r.sha256 for r in requests}
    for body in bodies:
        assert paths[sha256_hex(body)].read_bytes() == body
        assert final[sha256_hex(body)] == (len(body), len(body))


def test_ensure_many_of_blobs_present_starts_no_thread(
    https_server: HTTPSServer, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A warm worker's run finds its models in the store: checked in the caller's thread,
    # not by a pool started and joined for every run.
    import runflow_worker.cache.blobs as blobs_module

    bodies = [make_body(1000 + i, seed=i) for i in range(2)]
    for i, body in enumerate(bodies):
        https_server.add(f"/p{i}", body)
    store = make_store()
    requests = [BlobRequest(sha256_hex(b), [https_server.url(f"/p{i}")])
                for i, b in enumerate(bodies)]
    store.ensure_many(requests, max_parallel=2)  # downloads: through the pool
    seen: list[tuple[str, int, int | None]] = []

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread pool for blobs already present")

    monkeypatch.setattr(blobs_module, "ThreadPoolExecutor", no_pool)
    paths = store.ensure_many(requests, max_parallel=2,
                              progress=lambda sha, done, total: seen.append((sha, done, total)))
    assert {sha: p.read_bytes() for sha, p in paths.items()} == {
        sha256_hex(b): b for b in bodies}
    assert sorted(seen) == sorted((sha256_hex(b), len(b), len(b)) for b in bodies)


def test_ensure_many_raises_the_first_real_failure(
    https_server: HTTPSServer, make_store: StoreFactory
) -> None:
    https_server.add("/ok", BODY)
    https_server.add("/missing", b"", mode=Mode.STATUS, status=404)
    store = make_store()
    with pytest.raises(HTTPStatusError):
        store.ensure_many([(DIGEST, [https_server.url("/ok")]),
                           ("ab" * 32, [https_server.url("/missing")])], max_parallel=2)


def test_insufficient_disk_evicts_first_then_fails(
    https_server: HTTPSServer, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make_body(1_000_000, seed=9)
    https_server.add("/old", old)
    https_server.add("/m", BODY)
    store = make_store()
    store.ensure(sha256_hex(old), [https_server.url("/old")])
    # Pretend the volume has room for the new blob only once the old one is gone.
    baseline = store.total_bytes()
    monkeypatch.setattr(store, "_free",
                        lambda: len(BODY) - 500_000 + (baseline - store.total_bytes()))
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY
    assert not store.has(sha256_hex(old))

    monkeypatch.setattr(store, "_free", lambda: 10)
    other = make_body(100_000, seed=3)
    https_server.add("/other", other)
    with store.pin([DIGEST]), pytest.raises(InsufficientDisk, match="insufficient disk"):
        store.ensure(sha256_hex(other), [https_server.url("/other")])
    assert store.has(DIGEST)  # pinned: not evicted to make room
    assert partial_files(store) == []


def _put(store: BlobStore, server: HTTPSServer, name: str, size: int, seed: int) -> str:
    body = make_body(size, seed=seed)
    server.add(f"/{name}", body)
    return store.ensure(sha256_hex(body), [server.url(f"/{name}")]).name


def test_gc_is_lru_and_keeps_pinned_blobs(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    store = make_store()
    a, b, c = (_put(store, https_server, n, 100_000, i) for i, n in enumerate("abc"))
    for age_s, digest in ((300, a), (200, b), (100, c)):  # a is the least recently used
        t = os.path.getmtime(store.path_for(digest)) - age_s
        os.utime(store.path_for(digest), (t, t))
    store.link(c, store.root.parent / "run" / "c.bin")  # use refreshes c
    with store.pin([a]):
        result = store.gc(max_bytes=200_000)
    assert result.evicted == [b]
    assert result.kept_pinned == [a]
    assert store.has(a) and not store.has(b) and store.has(c)
    assert result.total_bytes == 200_000
    assert store.gc(max_bytes=0).evicted == [a, c]


def test_store_stays_under_its_budget(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    store = make_store(max_bytes=250_000)
    digests = [_put(store, https_server, f"b{i}", 100_000, i) for i in range(4)]
    assert store.total_bytes() <= 250_000
    assert store.has(digests[-1])


def test_link_hard_and_symbolic(
    https_server: HTTPSServer, make_store: StoreFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    blob = store.ensure(DIGEST, [https_server.url("/m")])
    base = tmp_path / "env" / "models"
    dest = store.link(DIGEST, base / "checkpoints" / "sd15.safetensors", base=base)
    assert os.path.samefile(dest, blob) and not dest.is_symlink()
    assert store.link(DIGEST, dest, base=base) == dest  # again: a no-op

    real_link = os.link

    def cross_device(src: object, dst: object, **kw: object) -> None:
        if str(dst).endswith(".link"):
            raise OSError(errno.EXDEV, "cross-device link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", cross_device)
    other = base / "loras" / "x.safetensors"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"stale file in the way")
    assert store.link(DIGEST, other, base=base).is_symlink()
    assert other.resolve() == blob and other.read_bytes() == BODY


def test_link_by_symlink_from_a_relative_store_and_no_leftover_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runflow_worker.cache.errors import CacheError
    from runflow_worker.cache.links import link_into

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "blob").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)  # a relative cache directory (RUNFLOW_CACHE_DIR=cache)
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EXDEV, "cross-device link")))
    run = tmp_path / "run" / "models"
    dest = link_into(Path("store/blob"), run / "m.bin", base=run)
    assert dest.is_symlink() and dest.read_bytes() == b"weights"
    (run / "dir").mkdir()  # something a link cannot replace
    with pytest.raises(CacheError):
        link_into(Path("store/blob"), run / "dir", base=run)
    assert sorted(p.name for p in run.iterdir()) == ["dir", "m.bin"]


def test_link_refuses_escapes(https_server: HTTPSServer, make_store: StoreFactory, tmp_path: Path) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    store.ensure(DIGEST, [https_server.url("/m")])
    base = tmp_path / "models"
    base.mkdir()
    (base / "sneaky").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for dest in (base / ".." / "x.bin", tmp_path / "x.bin", base / "sneaky" / "deep" / "x.bin"):
        with pytest.raises(UnsafePath):
            store.link(DIGEST, dest, base=base)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(BlobNotFound):
        store.link("cd" * 32, base / "y.bin", base=base)


def test_verify_quarantines_corrupt_blobs(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/m", BODY)
    store = make_store()
    path = store.ensure(DIGEST, [https_server.url("/m")])
    assert store.verify().ok == [DIGEST]
    os.chmod(path, 0o644)
    with path.open("r+b") as f:
        f.write(b"bitrot")
    result = store.verify()
    assert result.corrupt == [DIGEST] and len(result.quarantined) == 1
    assert not store.has(DIGEST)
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY  # fetched anew


@pytest.mark.parametrize("meanwhile", ["evicted", "fetched-again"])
def test_verify_leaves_a_blob_another_worker_replaced_while_it_hashed(
    meanwhile: str, https_server: HTTPSServer, make_store: StoreFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runflow_worker.cache import blobs as blobs_module

    https_server.add("/m", BODY)
    store = make_store()
    path = store.ensure(DIGEST, [https_server.url("/m")])
    os.chmod(path, 0o644)
    with path.open("r+b") as f:
        f.write(b"bitrot")
    real_hash = blobs_module.sha256_of

    def hash_then_other_worker(f) -> str:
        digest = real_hash(f)
        path.unlink()  # another worker's gc evicts the blob...
        if meanwhile == "fetched-again":  # ...and its next run downloads it again
            store.ensure(DIGEST, [https_server.url("/m")])
        return digest

    monkeypatch.setattr(blobs_module, "sha256_of", hash_then_other_worker)
    result = store.verify()
    assert result.corrupt == [DIGEST] and result.quarantined == []
    assert store.has(DIGEST) is (meanwhile == "fetched-again")
    if meanwhile == "fetched-again":
        assert path.read_bytes() == BODY  # the good copy stays where runs find it


def test_orphans_are_removed_when_the_store_opens(make_store: StoreFactory) -> None:
    store = make_store()
    tmp = store.partials.directory
    orphan = tmp / f"{DIGEST}.deadhost.999999.abcd1234.part"
    orphan.write_bytes(b"half a model")
    live = store.partials.create("ef" * 32)  # locked by a live writer (this process)
    try:
        reopened = make_store(orphan_max_age_s=0)
        assert not orphan.exists()
        assert live.path.exists()
        assert partial_files(reopened) == [live.path.name]
    finally:
        live.remove()


def test_an_orphan_is_adopted_and_resumed(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    route = https_server.add("/m", BODY)
    store = make_store()
    orphan = store.partials.directory / f"{DIGEST}.deadhost.999999.abcd1234.part"
    orphan.write_bytes(BODY[:777_777])
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY
    assert route.range_headers == ["bytes=777777-"]
    assert partial_files(store) == []


def test_a_complete_orphan_is_verified_not_downloaded_again(
    https_server: HTTPSServer, make_store: StoreFactory
) -> None:
    # Its writer was killed after the last byte, before publishing: the server answers the
    # resume with 416 (nothing left), and the file's hash decides.
    route = https_server.add("/m", BODY)
    store = make_store()
    orphan = store.partials.directory / f"{DIGEST}.deadhost.999999.abcd1234.part"
    orphan.write_bytes(BODY)
    assert store.ensure(DIGEST, [https_server.url("/m")]).read_bytes() == BODY
    assert route.range_headers == [f"bytes={len(BODY)}-"]  # one request, no body sent
    assert partial_files(store) == []


def test_pins_are_shared_locks(make_store: StoreFactory) -> None:
    store = make_store()
    digest = "12" * 32
    with store.pin([digest]):
        assert store.pins.is_pinned(digest)
        fd = os.open(store.pins.path(digest), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another reader is fine
        finally:
            os.close(fd)
    assert not store.pins.is_pinned(digest)


def test_invalid_digest(make_store: StoreFactory) -> None:
    store = make_store()
    for bad in ("", "xyz", "ab" * 31, "../" + "a" * 61):
        with pytest.raises(ValueError):
            store.ensure(bad, [])


def test_waiting_for_another_process_download_can_be_canceled(make_store: StoreFactory) -> None:
    import filelock

    store = make_store()
    other = filelock.FileLock(str(store.root / "locks" / f"{DIGEST}.lock"))
    other.acquire()  # "another worker" is downloading this digest
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) >= 2

    try:
        with pytest.raises(FetchCanceled):
            store.ensure(DIGEST, ["https://never.example/m"], cancel=cancel)
    finally:
        other.release()
    assert len(polls) == 2


def test_reservations_are_released(https_server: HTTPSServer, make_store: StoreFactory) -> None:
    https_server.add("/m", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=1_000_000)
    https_server.add("/bad", b"wrong")
    store = make_store()
    with pytest.raises(IntegrityError):
        store.ensure(DIGEST, [https_server.url("/bad")], size=len(BODY))
    store.ensure(DIGEST, [https_server.url("/m")], size=len(BODY))
    assert store._reserved_bytes == 0
