"""The store across processes: one download per digest, SIGKILL recovery, pins against gc."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.sources import Sources
from tests.cache import procs
from tests.cache.helpers import partial_files
from tests.support.bodies import make_body, sha256_hex
from tests.support.https_server import HTTPSServer, Mode
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

SPAWN = multiprocessing.get_context("spawn")
BODY = make_body(4 * 2**20 + 3)
DIGEST = sha256_hex(BODY)


@pytest.mark.parametrize("noop_lock", [False, True], ids=["filelock", "noop-lock"])
def test_eight_processes_one_blob(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path, noop_lock: bool
) -> None:
    route = https_server.add("/m", BODY)
    root = tmp_path / "cache" / "blobs"
    barrier = SPAWN.Barrier(8)
    results = SPAWN.Queue()
    children = [
        SPAWN.Process(target=procs.ensure_one,
                      args=(str(root), str(ca_bundle), DIGEST, https_server.url("/m"), noop_lock,
                            barrier, results))
        for _ in range(8)
    ]
    for child in children:
        child.start()
    reports = [results.get(timeout=90) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert [r[3] for r in reports] == [None] * 8
    assert {r[1] for r in reports} == {str(root / "sha256" / DIGEST[:2] / DIGEST)}
    assert {r[2] for r in reports} == {DIGEST}
    store = BlobStore(root)
    assert [b.sha256 for b in store.ls()] == [DIGEST]
    assert partial_files(store) == []
    if noop_lock:
        assert 1 <= route.hits <= 8
    else:
        assert route.hits == 1  # the lock made it one download for the volume


def test_sigkill_mid_download_then_a_new_process(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    route = https_server.add("/m", BODY, mode=Mode.STALL, cut_at=3 * 2**20)
    root = tmp_path / "cache" / "blobs"
    child = SPAWN.Process(target=procs.ensure_quietly,
                          args=(str(root), str(ca_bundle), DIGEST, https_server.url("/m")))
    child.start()
    assert route.stalled.wait(60)
    tmp_dir = root / "tmp"

    def partial_size() -> int:
        sizes = [p.stat().st_size for p in tmp_dir.glob("*.part")]
        return max(sizes, default=0)

    assert wait_for(lambda: partial_size() >= 2**20, timeout_s=30)  # bytes reached the disk
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    [orphan] = list(tmp_dir.glob("*.part"))
    kept = orphan.stat().st_size
    route.release()

    second = SPAWN.Process(target=procs.ensure_quietly,
                           args=(str(root), str(ca_bundle), DIGEST, https_server.url("/m")))
    second.start()
    second.join(90)
    assert second.exitcode == 0
    store = BlobStore(root)
    assert store.has(DIGEST)
    assert store.verify().ok == [DIGEST]
    assert not orphan.exists() and partial_files(store) == []
    assert kept >= 2**20
    assert route.range_headers[-1] == f"bytes={kept}-"  # resumed, not restarted


def test_pinned_blob_survives_another_process_gc(
    https_server: HTTPSServer, make_store: Callable[..., BlobStore], tmp_path: Path
) -> None:
    store = make_store()
    digests = []
    for i in range(3):
        body = make_body(1_000_000, seed=i)
        https_server.add(f"/b{i}", body)
        digests.append(store.ensure(sha256_hex(body), [https_server.url(f"/b{i}")]).name)
    pinned, gc_done = SPAWN.Event(), SPAWN.Event()
    results = SPAWN.Queue()
    run = SPAWN.Process(target=procs.use_pinned_blob,
                        args=(str(store.root), digests[0], str(tmp_path / "run"), pinned,
                              gc_done, results))
    run.start()
    assert pinned.wait(60)
    other_worker = BlobStore(store.root, sources=Sources())
    outcomes = [other_worker.gc(max_bytes=0) for _ in range(20)]
    gc_done.set()
    missing, reads = results.get(timeout=60)
    run.join(30)
    assert run.exitcode == 0
    assert missing == 0 and reads >= 3
    assert all(o.kept_pinned == [digests[0]] for o in outcomes)
    assert sorted(outcomes[0].evicted) == sorted(digests[1:])
    assert store.has(digests[0]) and not store.has(digests[1]) and not store.has(digests[2])
    # Unpinned now: the next gc may take it.
    assert other_worker.gc(max_bytes=0).evicted == [digests[0]]
