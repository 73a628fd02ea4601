"""Lock and pin files exist only while used: failed downloads and gc leave none behind."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.errors import CacheError, IntegrityError, URLRefused
from runflow_worker.cache.pins import FileLock, Pins, lock_current
from tests.support.bodies import sha256_hex
from tests.support.https_server import HTTPSServer

pytestmark = pytest.mark.timeout(60)

StoreFactory = Callable[..., BlobStore]


def leftovers(store: BlobStore) -> list[str]:
    """Files under the store's locks/ and pins/ directories."""
    return sorted(os.listdir(store.root / "locks")) + sorted(os.listdir(store.pins.directory))


def bogus(i: int) -> str:
    return sha256_hex(f"never published {i}".encode())


def test_refused_and_failed_downloads_leave_no_files(https_server: HTTPSServer,
                                                     make_store: StoreFactory) -> None:
    https_server.add("/wrong", b"not what was asked for")
    store = make_store()
    digests = [bogus(i) for i in range(40)]
    for i, digest in enumerate(digests):
        url = "http://plain.example/m" if i % 2 else https_server.url("/wrong")
        with pytest.raises(URLRefused if i % 2 else IntegrityError):
            store.ensure(digest, [url])
        assert leftovers(store) == [], f"after failure {i}"
    # As a run does it: every digest pinned for the run, the downloads failing inside.
    with store.pin(digests):
        with pytest.raises(CacheError):
            store.ensure_many([(d, ["http://plain.example/m"]) for d in digests],
                              max_parallel=4)
        assert len(os.listdir(store.pins.directory)) == len(digests)  # the run's pins
    assert leftovers(store) == []


def test_gc_removes_lock_and_pin_files_of_dead_processes(make_store: StoreFactory) -> None:
    store = make_store()
    dead = [bogus(i) for i in range(10)]
    for digest in dead:  # what a killed worker leaves: files, no locks
        (store.root / "locks" / f"{digest}.lock").touch()
        store.pins.path(digest).touch()
    live = bogus(99)
    download = FileLock(str(store.root / "locks" / f"{live}.lock"))
    download.acquire(timeout=0)
    try:
        with store.pin([live]):
            result = store.gc()
            assert result.stale_files_removed == 2 * len(dead)
            # Whatever another process holds stays.
            assert leftovers(store) == [f"{live}.lock", f"{live}.pin"]
    finally:
        download.release()
    assert leftovers(store) == []


def test_a_lock_landing_on_a_removed_file_is_taken_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between our open and our flock, the holder removed the file and another process took
    a new one: our lock on the removed file must not count."""
    import runflow_worker.cache.pins as pins_module

    path = tmp_path / "x.lock"
    path.touch()
    other = FileLock(str(path))
    real_flock = fcntl.flock
    calls: list[int] = []
    raced = threading.Event()

    def flock(fd: int, operation: int) -> None:
        if not raced.is_set():  # our first lock attempt: the race happens right before it
            raced.set()
            os.unlink(path)
            other.acquire(timeout=0)  # creates and locks the new file
        else:
            calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(pins_module.fcntl, "flock", flock)
    try:
        assert lock_current(path, fcntl.LOCK_EX | fcntl.LOCK_NB) is None  # the new one is held
        # After the lock on the removed file, the path was tried again (besides the other's).
        assert len(calls) == 2
    finally:
        monkeypatch.undo()
        other.release()
    assert not path.exists()


def test_pins_and_eviction_exclude_each_other_while_files_come_and_go(tmp_path: Path) -> None:
    """A pinner and an evictor hammer one entry whose pin file each removes when done: the
    evictor never holds the entry while a pin is held."""
    pins = Pins(tmp_path / "pins")
    state = {"pinned": 0, "evicted_while_pinned": 0, "evictions": 0}
    guard = threading.Lock()
    pinning = threading.Event()
    pinning.set()

    def pinner() -> None:
        for _ in range(500):
            with pins.pin(["entry"]):
                with guard:
                    state["pinned"] += 1
                with guard:
                    state["pinned"] -= 1
        pinning.clear()

    def evictor() -> None:
        while pinning.is_set():
            with pins.evicting("entry") as free:
                if free:
                    with guard:
                        state["evictions"] += 1
                        if state["pinned"]:
                            state["evicted_while_pinned"] += 1

    threads = [threading.Thread(target=pinner), threading.Thread(target=evictor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["evictions"] > 0  # they did meet
    assert state["evicted_while_pinned"] == 0
    assert os.listdir(pins.directory) == []
