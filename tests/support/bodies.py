"""Bodies of test downloads (blobs, inputs) and their digests."""

from __future__ import annotations

import hashlib


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
