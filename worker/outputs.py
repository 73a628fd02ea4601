"""Output collection (SPEC section 7): label, hash and store the files a run produced.

Files of Runflow Output nodes are labelled by their ``output_id`` (a batch gives several
entries with one ``output_id``). A graph without Runflow Output nodes returns the files of
its other output nodes, labelled by node id. Keys are ``runs/<run_id>/<output_id>/<file>``,
each part one safe path segment (``object_key``), so no run writes into another's folder.

The objects of a run that does not succeed are deleted again: ``discard_outputs`` (in the
caller's thread) or ``discard_outputs_later`` (on a background thread, so that a slow or
silent storage never delays the run's terminal record).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from runtime.graph import path_segment_problem
from runtime.protocol import OutputFile
from worker.contract import OutputEntry
from worker.errors import ErrorCode, RunFailure, StorageError
from worker.storage import MAX_KEY_SEGMENT_CHARS, ShouldStop, Storage, UploadCanceled

log = logging.getLogger(__name__)
DISCARD_BUDGET_S = 30.0
"""A background discard starts no delete after this long (each delete is bounded by the
storage client's own timeouts); the keys left are logged."""

_EXTRA_TYPES = {".webp": "image/webp", ".glb": "model/gltf-binary", ".safetensors":
                "application/octet-stream", ".flac": "audio/flac", ".webm": "video/webm"}


def content_type_of(name: str) -> str:
    """The MIME type for a file name (``application/octet-stream`` when unknown)."""
    suffix = Path(name).suffix.lower()
    return _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
    keep_if_late: ShouldStop | None = None,
) -> list[OutputEntry]:
    """Hash and upload the selected files; UPLOAD_FAILED if storage refuses one.

    ``should_stop`` is checked before each file and polled during each transfer; once it
    returns True the upload ends with ``UploadCanceled``. The key of every object that may
    have been written is appended to ``written`` (for ``discard_outputs`` when the run does
    not succeed after all). ``keep_if_late`` is handed to ``Storage.put``.
    """
    root = output_dir.resolve()
    entries: list[OutputEntry] = []
    used_keys: set[str] = set()
    for output_id, f in select_outputs(files):
        if should_stop is not None and should_stop():
            raise UploadCanceled("the run was stopped during the upload")
        path = (root / f.relpath).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise RunFailure(
                ErrorCode.NODE_ERROR,
                f"output node announced {f.relpath!r}, which is not a file of the run's "
                "output directory",
                node_id=f.node_id, node_type=f.node_type,
            )
        filename = path.name
        key = object_key(run_id, output_id, filename)
        n = 1
        while key in used_keys:  # two subfolders holding one name
            n += 1
            key = object_key(run_id, output_id, f"{path.stem}_{n}{path.suffix}")
        used_keys.add(key)
        digest = sha256_of(path)
        content_type = content_type_of(filename)
        if written is not None:
            written.append(key)
        try:
            storage.put(path, key, content_type=content_type, sha256=digest,
                        should_stop=should_stop, keep_if_late=keep_if_late)
            url = storage.url_for(key)
        except StorageError as exc:
            raise RunFailure(ErrorCode.UPLOAD_FAILED, str(exc)) from exc
        entries.append(OutputEntry(
            output_id=output_id, url=url, key=storage.full_key(key),
            filename=key.rsplit("/", 1)[-1], content_type=content_type,
            size_bytes=path.stat().st_size, sha256=digest, node_id=f.node_id,
        ))
    return entries


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
