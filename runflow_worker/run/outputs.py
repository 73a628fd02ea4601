"""Output collection (SPEC section 7): label, hash and store the files a run produced.

Files of Runflow Output nodes are labelled by their ``output_id`` (a batch gives several
entries with one ``output_id``). A graph without Runflow Output nodes returns the files of
its other output nodes, labelled by node id. Keys are ``runs/<run_id>/<output_id>/<file>``,
each part one safe path segment (``object_key``), so no run writes into another's folder.

The output directory is the ComfyUI child's, and the child runs hostile code: an "output"
may be a symlink to the worker's own files, or sit below a directory the child swapped for
a symlink. Each file is therefore opened from a directory the worker trusts, one path
component at a time, none followed if it is a symlink (``O_NOFOLLOW``), and must be a
regular file; what is hashed and uploaded is that open file (through ``/proc/self/fd``),
never the path again.

The objects of a run that does not succeed are deleted again: ``discard_outputs`` (in the
caller's thread) or ``discard_outputs_later`` (on a background thread, so that a slow or
silent storage never delays the run's terminal record).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mimetypes
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from runflow_worker.errors import ErrorCode, RunFailure, StorageError
from runflow_worker.run.contract import OutputEntry
from runflow_worker.run.storage import MAX_KEY_SEGMENT_CHARS, ShouldStop, Storage, UploadCanceled
from runflow_worker.runtime.graph import path_segment_problem
from runflow_worker.runtime.protocol import OutputFile

log = logging.getLogger(__name__)
DISCARD_BUDGET_S = 30.0
"""A background discard starts no delete after this long (each delete is bounded by the
storage client's own timeouts); the keys left are logged."""

_KNOWN_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".webp": "image/webp", ".mp4": "video/mp4",
                ".webm": "video/webm", ".wav": "audio/x-wav", ".mp3": "audio/mpeg",
                ".flac": "audio/flac", ".glb": "model/gltf-binary",
                ".safetensors": "application/octet-stream"}
"""What ComfyUI's output nodes write, looked up directly; ``mimetypes`` answers the rest
(it walks several tables a call, and its answers depend on the machine's own)."""


def content_type_of(name: str) -> str:
    """The MIME type for a file name (``application/octet-stream`` when unknown)."""
    suffix = os.path.splitext(name)[1].lower()
    return (_KNOWN_TYPES.get(suffix) or mimetypes.guess_type(name)[0]
            or "application/octet-stream")


HASH_CHUNK_BYTES = 4 << 20


def sha256_of(path: Path, should_stop: ShouldStop | None = None) -> str:
    """Hex sha256 of a file; ``UploadCanceled`` once ``should_stop`` returns True (checked
    every ``HASH_CHUNK_BYTES``: a node's sparse "output" of terabytes costs no disk but
    would keep the worker hashing for hours)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_of_fd(fd, path.name, should_stop)
    finally:
        os.close(fd)


def sha256_of_fd(fd: int, name: str, should_stop: ShouldStop | None = None) -> str:
    """``sha256_of`` the open file ``fd`` (read from offset 0 with ``pread``: its own
    offset is left as it is); ``name`` is for the message of a stopped hash."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK_BYTES, offset):
        if should_stop is not None and should_stop():
            raise UploadCanceled(f"hashing {name} stopped")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class UnsafeOutput(OSError):
    """An announced output that is no regular file reached without a symlink."""


@contextmanager
def open_output(trusted_root: Path, relpath: Path) -> Iterator[int]:
    """A read-only descriptor of the regular file ``trusted_root/relpath``, every component
    below ``trusted_root`` opened without following a symlink; ``UnsafeOutput`` otherwise.

    ``trusted_root`` itself is resolved normally: the worker made every component above it.
    """
    parts = relpath.parts
    if relpath.is_absolute() or not parts or any(p in ("", ".", "..") for p in parts):
        raise UnsafeOutput(errno.EINVAL, f"{relpath}: not a relative path below the root")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(trusted_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeOutput(exc.errno, f"{trusted_root}: {exc.strerror}") from exc
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise UnsafeOutput(exc.errno, f"{part}: not a directory (a symlink?)") from exc
            os.close(fd)
            fd = next_fd
        try:
            # O_NONBLOCK: a FIFO planted as an "output" must not hang the open.
            file_fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise UnsafeOutput(exc.errno, f"{parts[-1]}: cannot be opened (a symlink?)") from exc
    finally:
        os.close(fd)
    try:
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            raise UnsafeOutput(errno.EINVAL, f"{parts[-1]}: not a regular file")
        os.set_blocking(file_fd, True)
        yield file_fd
    finally:
        os.close(file_fd)


def select_outputs(files: Sequence[OutputFile]) -> list[tuple[str, OutputFile]]:
    """``(output_id, file)`` pairs per the labelling rule, first announcement wins."""
    labelled = [f for f in files if f.output_id]
    chosen = [(f.output_id or f.node_id, f) for f in labelled] if labelled else [
        (f.node_id, f) for f in files
    ]
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, OutputFile]] = []
    for output_id, f in chosen:
        if (output_id, f.relpath) not in seen:
            seen.add((output_id, f.relpath))
            out.append((output_id, f))
    return out


def object_key(run_id: str, output_id: str, filename: str) -> str:
    """``runs/<run_id>/<output_id>/<filename>``; UPLOAD_FAILED unless each part is one safe
    path segment (``path_segment_problem``, up to ``MAX_KEY_SEGMENT_CHARS`` characters), so
    the key stays under ``runs/<run_id>/``.

    Defence in depth: the run message checks refuse such ids before any GPU work, but a key
    that escaped its run's folder would overwrite another run's outputs.
    """
    for what, part in (("run id", run_id), ("output_id", output_id), ("file name", filename)):
        why = path_segment_problem(part, max_chars=MAX_KEY_SEGMENT_CHARS)
        if why is not None:
            raise RunFailure(ErrorCode.UPLOAD_FAILED,
                             f"refusing to store an output: its {what} {part!r} is not a "
                             f"single safe path segment (it {why})")
    return f"runs/{run_id}/{output_id}/{filename}"


def store_outputs(
    files: Sequence[OutputFile], output_dir: Path, run_id: str, storage: Storage, *,
    should_stop: ShouldStop | None = None, written: list[str] | None = None,
    keep_if_late: ShouldStop | None = None, trusted_root: Path | None = None,
) -> list[OutputEntry]:
    """Hash and upload the selected files; UPLOAD_FAILED if storage refuses one.

    Each file is opened from ``trusted_root`` (default: ``output_dir``) without following
    a symlink (``open_output``); one that is not a regular file reached that way fails the
    run with NODE_ERROR.

    ``should_stop`` is checked before each file and polled during each transfer; once it
    returns True the upload ends with ``UploadCanceled``. The key of every object that may
    have been written is appended to ``written`` (for ``discard_outputs`` when the run does
    not succeed after all). ``keep_if_late`` is handed to ``Storage.put``.
    """
    root = trusted_root if trusted_root is not None else output_dir
    try:
        # Pure, unlike ``os.path.relpath`` (which asks for the working directory twice).
        below = output_dir.relative_to(root)
    except ValueError:
        below = Path(os.path.relpath(output_dir, root))  # its ``..`` is refused on open
    entries: list[OutputEntry] = []
    used_keys: set[str] = set()
    for output_id, f in select_outputs(files):
        if should_stop is not None and should_stop():
            raise UploadCanceled("the run was stopped during the upload")
        relpath = Path(f.relpath)
        try:
            with open_output(root, below / relpath) as fd:
                entries.append(_store_one(fd, relpath, f, output_id, run_id,
                                          storage, used_keys, should_stop, written,
                                          keep_if_late))
        except UnsafeOutput as exc:
            raise RunFailure(
                ErrorCode.NODE_ERROR,
                f"output node announced {f.relpath!r}, which is not a regular file of the "
                f"run's output directory ({exc.strerror or exc})",
                node_id=f.node_id, node_type=f.node_type,
            ) from exc
    return entries


def _store_one(fd: int, relpath: Path, f: OutputFile, output_id: str, run_id: str,
               storage: Storage, used_keys: set[str], should_stop: ShouldStop | None,
               written: list[str] | None, keep_if_late: ShouldStop | None) -> OutputEntry:
    """Hash and upload the open output ``fd``: read through ``/proc/self/fd`` (the very
    file opened, whatever its path has become meanwhile). A storage that hashes as it
    stores reads it once, and the digest is of the stored bytes; otherwise the file is
    hashed first."""
    filename = relpath.name
    key = object_key(run_id, output_id, filename)
    n = 1
    while key in used_keys:  # two subfolders holding one name
        n += 1
        key = object_key(run_id, output_id, f"{relpath.stem}_{n}{relpath.suffix}")
    used_keys.add(key)
    path = Path(f"/proc/self/fd/{fd}")
    digest = None if storage.hashes_as_it_stores else sha256_of_fd(fd, filename, should_stop)
    content_type = content_type_of(filename)
    if written is not None:
        written.append(key)
    try:
        stored = storage.put(path, key, content_type=content_type, sha256=digest,
                             should_stop=should_stop, keep_if_late=keep_if_late)
        url = storage.url_for(key)
    except StorageError as exc:
        raise RunFailure(ErrorCode.UPLOAD_FAILED, str(exc)) from exc
    return OutputEntry(
        output_id=output_id, url=url, key=storage.full_key(key),
        filename=key.rsplit("/", 1)[-1], content_type=content_type,
        size_bytes=stored.size_bytes, sha256=stored.sha256, node_id=f.node_id,
    )


def discard_outputs(storage: Storage, keys: Sequence[str], *, run_id: str,
                    deadline: float | None = None) -> None:
    """Delete the objects of a run that did not succeed, best-effort (failures logged).

    With ``deadline`` (a ``time.monotonic()`` value) no delete starts after it; the keys
    left are logged.
    """
    for i, key in enumerate(keys):
        if deadline is not None and time.monotonic() >= deadline:
            log.warning("gave up deleting %d output(s) of run %s: out of time", len(keys) - i,
                        run_id, extra={"run_id": run_id, "event": "output_delete_failed",
                                       "keys": list(keys[i:])})
            return
        try:
            storage.delete(key)
        except StorageError as exc:
            log.warning("could not delete output %s of run %s: %s", key, run_id, exc,
                        extra={"run_id": run_id, "event": "output_delete_failed"})
        except Exception:  # a bug: logged with its traceback; the other keys still go
            log.exception("could not delete output %s of run %s", key, run_id,
                          extra={"run_id": run_id, "event": "output_delete_failed"})


def discard_outputs_later(storage: Storage, keys: Sequence[str], *, run_id: str,
                          budget_s: float = DISCARD_BUDGET_S) -> threading.Thread:
    """``discard_outputs`` on a background thread (started, and returned for tests).

    The caller does not wait: the run's terminal record must not wait for a storage that
    is slow or stopped answering. Bounded: no delete starts after ``budget_s``, and each
    one is bounded by the storage client's timeouts. Not a daemon thread: a process exiting
    right after the run (the one-shot ``run`` command) still deletes what it stored.
    """
    thread = threading.Thread(
        target=discard_outputs, args=(storage, list(keys)),
        kwargs={"run_id": run_id, "deadline": time.monotonic() + budget_s},
        name=f"discard-{run_id}")
    thread.start()
    return thread
