"""Output collection (SPEC section 7): label, hash and store the files a run produced.

Files of Runflow Output nodes are labelled by their ``output_id`` (a batch gives several
entries with one ``output_id``). A graph without Runflow Output nodes returns the files of
its other output nodes, labelled by node id.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Sequence
from pathlib import Path

from runtime.protocol import OutputFile
from worker.contract import OutputEntry
from worker.errors import ErrorCode, RunFailure, StorageError
from worker.storage import Storage

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


def store_outputs(
    files: Sequence[OutputFile], output_dir: Path, run_id: str, storage: Storage
) -> list[OutputEntry]:
    """Hash and upload the selected files; UPLOAD_FAILED if storage refuses one."""
    root = output_dir.resolve()
    entries: list[OutputEntry] = []
    used_keys: set[str] = set()
    for output_id, f in select_outputs(files):
        path = (root / f.relpath).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise RunFailure(
                ErrorCode.NODE_ERROR,
                f"output node announced {f.relpath!r}, which is not a file of the run's "
                "output directory",
                node_id=f.node_id, node_type=f.node_type,
            )
        filename = path.name
        key = f"runs/{run_id}/{output_id}/{filename}"
        n = 1
        while key in used_keys:  # two subfolders holding one name
            n += 1
            key = f"runs/{run_id}/{output_id}/{path.stem}_{n}{path.suffix}"
        used_keys.add(key)
        digest = sha256_of(path)
        content_type = content_type_of(filename)
        try:
            storage.put(path, key, content_type=content_type, sha256=digest)
            url = storage.url_for(key)
        except StorageError as exc:
            raise RunFailure(ErrorCode.UPLOAD_FAILED, str(exc)) from exc
        entries.append(OutputEntry(
            output_id=output_id, url=url, key=storage.full_key(key),
            filename=key.rsplit("/", 1)[-1], content_type=content_type,
            size_bytes=path.stat().st_size, sha256=digest, node_id=f.node_id,
        ))
    return entries
