"""Proofs: a run's own source shows it holds the bytes of a blob the store already has.

A blob a private source gave (``cache.access``) is handed to a run of another owner only
after this: the run's sources (mirrors first, as for a download) are tried in turn, and one
must give content with the blob's sha256. The proof is as strong as a download: every byte
comes from that source, read into a fresh temporary file (a name no download adopts, so a
proof's bytes never become part of a resumed download), hashed and removed; or the source
vouches for the sha256 of its whole content itself (``S3Source.content_sha256``). It fails
with what a download from those sources would have raised, so a run learns nothing of what
the store holds. The disk space a proof reads into is reserved like a download's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from runflow_worker.cache.errors import (
    CacheError,
    FetchCanceled,
    InsufficientDisk,
    IntegrityError,
    SourceUnavailable,
    combine_errors,
    from_os_error,
)
from runflow_worker.cache.progress import Cancel, Progress
from runflow_worker.cache.sources import Source

if TYPE_CHECKING:
    from runflow_worker.cache.blobs import BlobStore


def prove(store: BlobStore, digest: str, size_bytes: int, urls: Sequence[str],
          owner: str | None, progress: Progress | None, cancel: Cancel | None) -> None:
    """Have one of ``urls`` (or a mirror) show it holds the bytes of the blob ``digest`` of
    ``store``, and record that for ``owner``; raise what a failed download from them would
    raise.

    The proof is as strong as a download: every byte comes from that source (a fresh
    file, never a resumed one), or S3 vouches for the sha256 of the whole object.
    """
    candidates = store.sources.for_digest(digest, urls)
    if not candidates:
        raise SourceUnavailable(f"no source for sha256 {digest[:12]}", reason="no_source")
    errors: list[CacheError] = []
    for candidate in candidates:
        if isinstance(candidate, CacheError):
            errors.append(candidate)
            continue
        try:
            shown = _content_sha256(store, candidate, digest, size_bytes, progress, cancel)
        except (FetchCanceled, InsufficientDisk):
            raise
        except CacheError as exc:
            errors.append(exc)
            continue
        if shown != digest:
            errors.append(IntegrityError(
                f"{candidate.label} gave sha256 {shown[:12]}..., expected {digest[:12]}..."))
            continue
        try:
            store.access.record(digest, owner, private=candidate.private)
        except OSError as exc:
            raise from_os_error(exc, f"recording access to sha256 {digest[:12]}...") from exc
        return
    raise combine_errors(digest, errors)


def _content_sha256(store: BlobStore, candidate: Source, digest: str, size_bytes: int,
                    progress: Progress | None, cancel: Cancel | None) -> str:
    """The sha256 of what ``candidate`` holds: the source's own checksum of its whole
    content where it keeps one, else its bytes read into a temporary file, hashed and
    removed."""
    kept = getattr(candidate, "content_sha256", None)
    known = kept() if callable(kept) else None
    # Other bytes are told by the checksum alone; the blob's digest needs the size to agree
    # too (a kept sha256 of the blob with another size is no checksum to trust).
    if known is not None and (known[0] != digest or known[1] == size_bytes):
        if progress is not None:
            progress(known[1], known[1])
        return str(known[0])
    # A name no download adopts: a proof's bytes never become a resumed download's.
    partial = store.partials.create(f"proof-{digest}")
    reserved = 0

    def before_body(remaining_bytes: int | None) -> None:
        # The store's own reservation, as for a download (one module's worth of friends).
        nonlocal reserved
        store._release(reserved)
        reserved = 0
        reserved = store._reserve(remaining_bytes, keep=partial.path)

    try:
        return candidate.fetch(partial.path, max_bytes=store.max_blob_bytes,
                               progress=progress, cancel=cancel,
                               before_body=before_body).sha256
    except OSError as exc:
        raise from_os_error(exc, "checking a source") from exc
    finally:
        store._release(reserved)
        partial.remove()
