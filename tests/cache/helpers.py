"""Small helpers shared by the cache tests."""

from __future__ import annotations

import hashlib
import os

from cache.blobs import BlobStore

LOOPBACK_ALLOW = ("127.0.0.1/32",)
TEST_HOSTNAMES = ("files.test", "redirector.test", "rebind.test")


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def make_body(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def partial_files(store: BlobStore) -> list[str]:
    """Names of the temporary files in the store's tmp directory."""
    return sorted(os.listdir(store.partials.directory))
