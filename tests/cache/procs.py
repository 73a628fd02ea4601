"""Child-process entry points for the multi-process store tests (run with the spawn method)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.hashing import sha256_file
from runflow_worker.cache.sources import Sources
from runflow_worker.cache.urlpolicy import URLPolicy


class NoopLock:
    """A lock that always "succeeds" and excludes nobody."""

    def __init__(self, path: str) -> None:
        self.path = path

    def acquire(self, timeout: float = -1) -> None:
        return None

    def release(self) -> None:
        return None


def _store(root: str, ca_bundle: str | None, *, noop_lock: bool = False) -> BlobStore:
    fetcher = Fetcher(URLPolicy(["127.0.0.1/32"]), ca_bundle=ca_bundle, timeout_s=20)
    kwargs: dict[str, Any] = {"lock_factory": NoopLock} if noop_lock else {}
    return BlobStore(Path(root), sources=Sources(fetcher=fetcher), **kwargs)


def ensure_one(root: str, ca_bundle: str, digest: str, url: str, noop_lock: bool,
               barrier: Any, results: Any) -> None:
    """Wait for every sibling at the barrier, then ensure the digest; report path and hash."""
    store = _store(root, ca_bundle, noop_lock=noop_lock)
    barrier.wait(60)
    try:
        path = store.ensure(digest, [url])
        results.put((os.getpid(), str(path), sha256_file(path), None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put((os.getpid(), None, None, repr(exc)))


def ensure_quietly(root: str, ca_bundle: str, digest: str, url: str) -> None:
    """Ensure the digest; the parent kills this process while it downloads."""
    _store(root, ca_bundle).ensure(digest, [url])


def use_pinned_blob(root: str, digest: str, run_dir: str, pinned: Any, gc_done: Any,
                    results: Any) -> None:
    """A run: pin, ensure, link, then keep reading the blob until the parent's gc is over.

    Reports ``(FileNotFoundError count, reads)``.
    """
    store = BlobStore(Path(root))
    missing = 0
    reads = 0
    with store.pin([digest]):
        blob = store.ensure(digest)
        linked = store.link(digest, Path(run_dir) / "models" / "m.bin", base=Path(run_dir))
        via_symlink = Path(run_dir) / "symlinked.bin"
        via_symlink.symlink_to(blob)
        pinned.set()
        while True:
            done = gc_done.is_set()
            for path in (blob, linked, via_symlink):
                try:
                    with open(path, "rb") as f:
                        while f.read(1 << 20):
                            pass
                    reads += 1
                except FileNotFoundError:
                    missing += 1
            if done:
                break
    results.put((missing, reads))
