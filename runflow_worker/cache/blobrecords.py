"""The plain records the blob store takes and hands out (``cache.blobs``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runflow_worker.cache.access import Access


@dataclass(frozen=True)
class BlobInfo:
    """A published blob: digest, path, size in bytes, last use (epoch seconds), pinned now."""

    sha256: str
    path: Path
    size_bytes: int
    last_used: float
    pinned: bool
    access: Access
    """Public, or how many owners' sources have shown the bytes (``cache.access``)."""


@dataclass(frozen=True)
class BlobRequest:
    """One blob a run needs: digest, the URLs it may come from, and its size if known."""

    sha256: str
    sources: Sequence[str] = ()
    size: int | None = None


@dataclass
class GcResult:
    """What a gc did: digests evicted, bytes freed, pinned blobs kept, bytes left in the store."""

    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_pinned: list[str] = field(default_factory=list)
    total_bytes: int = 0
    orphans_removed: int = 0
    stale_files_removed: int = 0
    """Lock and pin files nobody held (left by processes that died)."""
    access_records_removed: int = 0
    """Access records of blobs no longer in the store."""


@dataclass
class VerifyResult:
    """What a verify found: good digests, corrupt ones, and where corrupt blobs were moved."""

    ok: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    """Blobs with no access record (from before the records, or lost in a crash): handed
    to a run only once its source has shown them."""


@dataclass
class StoreStats:
    """Counters for metrics: ensure hits and misses, bytes downloaded."""

    hits: int = 0
    misses: int = 0
    downloaded_bytes: int = 0
