"""The content-addressed blob store for models and resources.

Layout under ``root`` (``<cache>/blobs``)::

    sha256/<first 2 hex>/<64 hex>   published blobs, read-only; mtime = last use
    tmp/<64 hex>.<host>.<pid>.<random>.part   downloads in progress (see ``partials``)
    locks/<64 hex>.lock             one download per digest across processes (``pins.FileLock``)
    pins/<64 hex>.pin               blobs in use by runs (see ``pins``)
    quarantine/<64 hex>.<time>      blobs that failed ``verify``
    access/<64 hex>/                who may be handed the blob (see ``access``)

A blob is fetched once per volume: ``ensure`` returns at once when the digest is present,
whatever URL it is asked with; otherwise it takes the digest's lock, streams a source into a
locked temporary file while hashing, checks the sha256, fsyncs, and publishes with
``os.link`` (which fails rather than overwrite, so a blob is published once even if the lock
does nothing). Eviction is LRU under a byte budget, by a last-use time the store records
(the blob's mtime, set on ``ensure`` and ``link``), and skips pinned blobs.

``ensure`` is asked for a run's owner: a present blob that a private source gave is handed
to another owner's run only once that run's own source has shown the same bytes (``_prove``:
S3's own sha256 of the whole object where it keeps one, else the bytes read in full, hashed
and dropped). A failed proof fails as that download would have failed, so a run cannot tell
whether the store holds a digest it may not have.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager
from pathlib import Path

from runflow_worker.cache.access import AccessRecords
from runflow_worker.cache.blobrecords import (
    BlobInfo,
    BlobRequest,
    GcResult,
    StoreStats,
    VerifyResult,
)
from runflow_worker.cache.errors import (
    BlobNotFound,
    CacheError,
    FetchCanceled,
    FetchInterrupted,
    FetchTimeout,
    InsufficientDisk,
    IntegrityError,
    SourceUnavailable,
    combine_errors,
    from_os_error,
)
from runflow_worker.cache.fetcher import DEFAULT_MAX_BYTES
from runflow_worker.cache.hashing import sha256_of
from runflow_worker.cache.links import link_into
from runflow_worker.cache.partials import Partial, Partials
from runflow_worker.cache.pins import FileLock, Pins
from runflow_worker.cache.pins import clean as clean_lock_files
from runflow_worker.cache.progress import Cancel, Lock, Progress, acquire_or_cancel
from runflow_worker.cache.proofs import prove
from runflow_worker.cache.sources import Sources

_DIGEST = re.compile(r"[0-9a-f]{64}")
DEFAULT_ORPHAN_MAX_AGE_S = 3600.0


LockFactory = Callable[[str], Lock]
ManyProgress = Callable[[str, int, int | None], None]


def _file_lock(path: str) -> Lock:
    # Not filelock's: a lock file here is removed by its holder, so a store asked for many
    # digests that never arrive keeps no file for each (see ``cache.pins``).
    return FileLock(path)


def check_digest(sha256: str) -> str:
    """Return ``sha256`` in lower case; raise ``ValueError`` unless it is 64 hex digits."""
    value = sha256.strip().lower()
    if not _DIGEST.fullmatch(value):
        raise ValueError("a sha256 digest is 64 hex digits")
    return value


class BlobStore:
    """Content-addressed store at ``root`` (see the module docstring).

    ``sources``: how URLs become bytes (mirrors, https, s3, assets). ``max_bytes``: the byte
    budget (None: no budget). ``min_free_bytes``: disk space always left free.
    ``lock_factory``: per-digest inter-process lock (``cache.pins.FileLock`` by default, whose
    holder removes its file on release).
    ``orphan_max_age_s``: orphaned partial downloads older than this are removed when the store
    opens; younger ones are kept so the next download of that digest resumes them.
    ``max_blob_bytes``: largest single blob.
    """

    def __init__(
        self,
        root: Path,
        *,
        sources: Sources | None = None,
        max_bytes: int | None = None,
        min_free_bytes: int = 0,
        lock_factory: LockFactory = _file_lock,
        orphan_max_age_s: float = DEFAULT_ORPHAN_MAX_AGE_S,
        max_blob_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.root = Path(root)
        self.sources = sources or Sources()
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.max_blob_bytes = max_blob_bytes
        self.orphan_max_age_s = orphan_max_age_s
        self.stats = StoreStats()
        self._lock_factory = lock_factory
        self._blobs_dir = self.root / "sha256"
        self._locks_dir = self.root / "locks"
        self._quarantine_dir = self.root / "quarantine"
        for d in (self._blobs_dir, self._locks_dir, self._quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pins = Pins(self.root / "pins")
        self.partials = Partials(self.root / "tmp")
        self.access = AccessRecords(self.root / "access")
        self._mutex = threading.Lock()
        self._reserved_bytes = 0
        self.partials.clean(min_age_s=orphan_max_age_s)

    # -- lookup -----------------------------------------------------------------------------

    def path_for(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (whether or not it is present)."""
        digest = check_digest(sha256)
        return self._blobs_dir / digest[:2] / digest

    def has(self, sha256: str) -> bool:
        """Whether the blob is present (whoever may be handed it)."""
        return self.path_for(sha256).is_file()

    def usable(self, sha256: str, owner: str | None) -> bool:
        """Whether the blob is present and a run of ``owner`` may be handed it without a
        proof (what a run may learn of the store: never whether another owner's blob is)."""
        return self.has(sha256) and self.access.allows(check_digest(sha256), owner)

    def pin(self, digests: Iterable[str]) -> AbstractContextManager[None]:
        """Context manager: while it is open, no process on this volume evicts these blobs.

        Pin the blobs of a run before ``ensure`` and keep the pin until the run is done.
        """
        return self.pins.pin(check_digest(d) for d in digests)

    # -- fetching ---------------------------------------------------------------------------

    def ensure(
        self,
        sha256: str,
        sources: Sequence[str] = (),
        size: int | None = None,
        *,
        owner: str | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> Path:
        """Return the path of the blob for a run of ``owner``, downloading it first if it is
        not present, or having ``sources`` show they hold it when a private source of another
        owner gave it (see ``cache.access``; None is the owner of runs without one).

        ``sources`` are URLs tried in order (after local mirrors) until one gives content with
        this sha256; ``size`` (bytes, if known) is used for the disk check before download.
        ``progress(done_bytes, total_bytes_or_None)``; ``cancel()`` true stops the download
        with ``FetchCanceled``. Raises ``IntegrityError`` (content does not match),
        ``InsufficientDisk``, ``SourceUnavailable`` or another ``FetchError``: a failed proof
        raises what a failed download from those sources raises.
        """
        digest = check_digest(sha256)
        final = self.path_for(digest)
        with self.pins.pin([digest]):
            downloaded = self._download_if_missing(digest, final, sources, size, owner,
                                                   progress, cancel)
            if downloaded and self.max_bytes is not None and self.total_bytes() > self.max_bytes:
                self.gc()  # pinned: never this blob
            if not self.access.allows(digest, owner):
                prove(self, digest, final.stat().st_size, sources, owner, progress, cancel)
            if not downloaded and not self._hit(final, progress):  # pinned: still there
                raise BlobNotFound(f"sha256 {digest[:12]}... vanished from the store")
            return final

    def _download_if_missing(self, digest: str, final: Path, sources: Sequence[str],
                             size: int | None, owner: str | None,
                             progress: Progress | None, cancel: Cancel | None) -> bool:
        """Download and publish the blob unless it is present; True when this call did."""
        if final.is_file():
            return False
        lock = self._lock_factory(str(self._locks_dir / f"{digest}.lock"))
        self._acquire(lock, cancel)
        try:
            if final.is_file():  # another worker published it meanwhile
                return False
            with self._mutex:
                self.stats.misses += 1
            try:
                self._download(digest, final, sources, size, owner, progress, cancel)
            except OSError as exc:
                raise from_os_error(exc, f"storing sha256 {digest[:12]}...") from exc
            return True
        finally:
            lock.release()

    def ensure_many(
        self,
        items: Iterable[BlobRequest | tuple[str, Sequence[str]] | tuple[str, Sequence[str], int]],
        *,
        owner: str | None = None,
        max_parallel: int = 4,
        progress: ManyProgress | None = None,
        cancel: Cancel | None = None,
    ) -> dict[str, Path]:
        """``ensure`` several blobs for a run of ``owner``, at most ``max_parallel`` downloads
        at a time.

        ``progress(sha256, done_bytes, total_bytes_or_None)``. The first failure cancels the
        other downloads and is raised. Returns ``{sha256: path}``.
        """
        requests: dict[str, BlobRequest] = {}
        for item in items:
            req = item if isinstance(item, BlobRequest) else BlobRequest(*item)
            digest = check_digest(req.sha256)
            known = requests.get(digest)
            urls = list(known.sources) if known else []
            urls += [u for u in req.sources if u not in urls]
            requests[digest] = BlobRequest(digest, urls, req.size or (known.size if known else None))
        stop = threading.Event()

        def stopped() -> bool:
            return stop.is_set() or (cancel is not None and bool(cancel()))

        def one(req: BlobRequest) -> Path:
            report = (lambda d, t: progress(req.sha256, d, t)) if progress else None
            return self.ensure(req.sha256, req.sources, req.size, owner=owner, progress=report,
                               cancel=stopped)

        results: dict[str, Path] = {}
        first_error: BaseException | None = None
        # What is here already for this owner costs a few file checks: done in this thread.
        # A pool (a thread started and joined for every run of a warm worker) only for the
        # downloads and proofs, and only when there are several.
        for digest, req in list(requests.items()):
            if self.path_for(digest).is_file() and self.access.allows(digest, owner):
                results[digest] = one(requests.pop(digest))
        if len(requests) == 1:
            req = next(iter(requests.values()))
            results[req.sha256] = one(req)
            return results
        if not requests:
            return results
        with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(requests)))) as pool:
            futures = {pool.submit(one, req): digest for digest, req in requests.items()}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    stop.set()
                    if first_error is None or isinstance(first_error, FetchCanceled):
                        first_error = exc
        if first_error is not None:
            raise first_error
        return results

    def _hit(self, final: Path, progress: Progress | None) -> bool:
        try:
            size = final.stat().st_size
        except FileNotFoundError:
            return False
        self._touch(final)
        with self._mutex:
            self.stats.hits += 1
        if progress is not None:
            progress(size, size)
        return True

    def _acquire(self, lock: Lock, cancel: Cancel | None) -> None:
        acquire_or_cancel(lock, cancel, lambda: FetchCanceled(
            "canceled while waiting for another download"))

    def _download(
        self,
        digest: str,
        final: Path,
        urls: Sequence[str],
        size: int | None,
        owner: str | None,
        progress: Progress | None,
        cancel: Cancel | None,
    ) -> Path:
        candidates = self.sources.for_digest(digest, urls)
        if not candidates:
            raise SourceUnavailable(f"no source for sha256 {digest[:12]}", reason="no_source")
        partial = self.partials.claim(digest)
        errors: list[CacheError] = []
        reserved = 0
        keep_partial = False

        def before_body(remaining_bytes: int | None) -> None:
            nonlocal reserved
            self._release(reserved)  # replaced by what the source now says is to come
            reserved = 0
            reserved = self._reserve(remaining_bytes if remaining_bytes is not None else size,
                                     keep=partial.path)

        try:
            if size is not None:
                reserved = self._reserve(max(0, size - partial.size()), keep=partial.path)
            for candidate in candidates:
                if isinstance(candidate, CacheError):
                    errors.append(candidate)
                    continue
                if candidate.private:
                    # Never resumed by another download (another owner's source could
                    # then show just the tail of these bytes and have them all).
                    partial = self.partials.set_aside(partial)
                offset = partial.size()
                try:
                    result = candidate.fetch(
                        partial.path, start_offset=offset, max_bytes=self.max_blob_bytes,
                        progress=progress, cancel=cancel, before_body=before_body,
                    )
                    if result.sha256 != digest and offset > 0:
                        # The kept bytes may be what is wrong: try this source once from zero.
                        partial.truncate()
                        result = candidate.fetch(
                            partial.path, max_bytes=self.max_blob_bytes, progress=progress,
                            cancel=cancel, before_body=before_body,
                        )
                except (FetchCanceled, InsufficientDisk):
                    keep_partial = partial.size() > 0
                    raise
                except CacheError as exc:
                    errors.append(exc)
                    keep_partial = isinstance(exc, (FetchInterrupted, FetchTimeout))
                    continue
                finally:
                    self._release(reserved)
                    reserved = 0
                if result.sha256 != digest:
                    errors.append(IntegrityError(
                        f"{candidate.label} gave sha256 {result.sha256[:12]}..., "
                        f"expected {digest[:12]}..."
                    ))
                    partial.truncate()
                    keep_partial = False
                    continue
                # Recorded before the blob appears: no one may see it without its record.
                # A private source that only finished an earlier download's bytes (of any
                # owner) has shown their tail alone: it proves itself in full after.
                if offset == 0 or not candidate.private:
                    self.access.record(digest, owner, private=candidate.private)
                self._publish(partial, final)
                with self._mutex:
                    self.stats.downloaded_bytes += result.size
                return final
            raise combine_errors(digest, errors)
        finally:
            self._release(reserved)
            if keep_partial and not self.partials.is_aside(partial) and partial.path.exists():
                partial.close()  # left unlocked: the next download of this digest resumes it
            else:
                partial.remove()

    def _publish(self, partial: Partial, final: Path) -> None:
        os.chmod(partial.path, 0o444)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            # link, not rename: it refuses to replace an existing blob, so a digest is
            # published once even when the download lock did not exclude another process.
            os.link(partial.path, final)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if not final.exists():  # a filesystem without hard links
                os.rename(partial.path, final)
        _fsync_dir(final.parent)
        self._touch(final)

    # -- disk space and budget --------------------------------------------------------------

    def _reserve(self, need_bytes: int | None, *, keep: Path | None = None) -> int:
        """Make room for ``need_bytes`` more bytes (evicting if needed) and reserve them."""
        if not need_bytes:
            return 0
        if self.max_bytes is not None and self.total_bytes() + need_bytes > self.max_bytes:
            self.gc(max(0, self.max_bytes - need_bytes))
        with self._mutex:
            shortfall = need_bytes + self.min_free_bytes + self._reserved_bytes - self._free()
        if shortfall > 0:
            self.partials.clean(keep=keep)
            self.gc(max(0, self.total_bytes() - shortfall))
        with self._mutex:
            free = self._free() - self.min_free_bytes - self._reserved_bytes
            if free < need_bytes:
                raise InsufficientDisk(
                    f"insufficient disk for a {need_bytes}-byte download: "
                    f"{max(free, 0)} bytes free after eviction"
                )
            self._reserved_bytes += need_bytes
        return need_bytes

    def _release(self, reserved_bytes: int) -> None:
        if reserved_bytes:
            with self._mutex:
                self._reserved_bytes -= reserved_bytes

    def _free(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- listing, eviction, verification ---------------------------------------------------

    def _scan(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        try:
            shards = list(os.scandir(self._blobs_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                if _DIGEST.fullmatch(entry.name):
                    try:
                        yield entry.name, Path(entry.path), entry.stat()
                    except FileNotFoundError:
                        continue

    def ls(self) -> list[BlobInfo]:
        """Every blob, most recently used first."""
        infos = [
            BlobInfo(d, p, st.st_size, st.st_mtime, self.pins.is_pinned(d),
                     self.access.describe(d))
            for d, p, st in self._scan()
        ]
        return sorted(infos, key=lambda i: i.last_used, reverse=True)

    def total_bytes(self) -> int:
        """Bytes held by published blobs."""
        return sum(st.st_size for _d, _p, st in self._scan())

    def gc(self, max_bytes: int | None = None) -> GcResult:
        """Evict least recently used, unpinned blobs until the store holds at most
        ``max_bytes`` (default: the store's budget); also remove old orphaned partials."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        result = GcResult()
        gc_lock = self._lock_factory(str(self._locks_dir / "gc.lock"))
        gc_lock.acquire(timeout=-1)
        try:
            result.orphans_removed = self.partials.clean(min_age_s=self.orphan_max_age_s)
            result.stale_files_removed = (clean_lock_files(self._locks_dir, ".lock")
                                          + self.pins.clean())
            blobs = sorted(self._scan(), key=lambda item: item[2].st_mtime)
            total = sum(st.st_size for _d, _p, st in blobs)
            for digest, path, st in blobs:
                if budget is None or total <= budget:
                    break
                with self.pins.evicting(digest) as free:
                    if not free:
                        result.kept_pinned.append(digest)
                        continue
                    path.unlink(missing_ok=True)
                    self.access.forget(digest)
                total -= st.st_size
                result.evicted.append(digest)
                result.freed_bytes += st.st_size
            result.total_bytes = total
            result.access_records_removed = self._forget_orphaned_access()
        finally:
            gc_lock.release()
        return result

    def _forget_orphaned_access(self) -> int:
        """Remove the access records of digests whose blob is gone (evicted by an older
        worker, quarantined, a crash between record and publish); return how many."""
        removed = 0
        for digest in self.access.digests():
            if self.has(digest):
                continue
            # Free means no ensure (download or proof) of this digest is under way.
            with self.pins.evicting(digest) as free:
                if free and not self.has(digest):
                    self.access.forget(digest)
                    removed += 1
        return removed

    def verify(self, digests: Iterable[str] | None = None, *, quarantine: bool = True) -> VerifyResult:
        """Re-hash blobs (all, or ``digests``); report corrupt ones and, unless pinned, move
        them to ``quarantine/`` so the next ``ensure`` downloads them again."""
        result = VerifyResult()
        wanted = None if digests is None else {check_digest(d) for d in digests}
        for digest, path, _st in sorted(self._scan()):
            if wanted is not None and digest not in wanted:
                continue
            try:
                f = path.open("rb", buffering=0)
            except FileNotFoundError:
                continue
            # Open until the verdict: the file hashed keeps its inode number, so no blob
            # published meanwhile (after another worker evicted this one) can share it.
            with f:
                hashed = os.fstat(f.fileno())
                if sha256_of(f) == digest:
                    result.ok.append(digest)
                    if not self.access.describe(digest).recorded:
                        result.unrecorded.append(digest)
                    continue
                result.corrupt.append(digest)
                if quarantine:
                    with self.pins.evicting(digest) as free:
                        target = self._quarantine(digest, path, hashed) if free else None
                        if target is not None:
                            result.quarantined.append(target)
        return result

    def _quarantine(self, digest: str, path: Path, hashed: os.stat_result) -> Path | None:
        """Move the corrupt blob at ``path`` aside; None when it is no longer the file that
        was hashed (evicted, or evicted and downloaded again by another worker meanwhile)."""
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) != (hashed.st_dev, hashed.st_ino):
                return None
            target = self._quarantine_dir / f"{digest}.{int(time.time())}"
            os.rename(path, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_os_error(exc, f"quarantining {digest[:12]}...") from exc
        return target

    # -- linking ----------------------------------------------------------------------------

    def link(self, sha256: str, dest: Path, *, base: Path | None = None) -> Path:
        """Make the blob appear at ``dest`` (see ``cache.links.link_into``): a hard link, else
        a symbolic link, never a copy. With ``base``, refuse a ``dest`` outside it."""
        blob = self.path_for(sha256)
        if not blob.is_file():
            raise BlobNotFound(f"sha256 {check_digest(sha256)[:12]}... is not in the store")
        dest = link_into(blob, dest, base=base)
        self._touch(blob)
        return dest

    def hardlink(self, sha256: str, dest: Path, *, base: Path | None = None) -> Path:
        """Make the blob appear at ``dest`` as a hard link, never a symlink (a sandbox sees
        no store to resolve one in); a copy, with a warning, where the filesystems differ.

        Seen only through a read-only mount, a hard link can be neither written nor
        chmod-ed, so the store's bytes stay as they are.
        """
        blob = self.path_for(sha256)
        if not blob.is_file():
            raise BlobNotFound(f"sha256 {check_digest(sha256)[:12]}... is not in the store")
        dest = link_into(blob, dest, base=base, copy_fallback=True)
        self._touch(blob)
        return dest

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass  # a blob owned by another user on a shared volume: LRU is best effort


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
