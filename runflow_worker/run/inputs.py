"""Caller-supplied files: fetched into the run's input directory and checked by content.

IMAGE inputs must be PNG, JPEG, WebP or GIF *by content* (never by name) and under a pixel
limit (a decompression-bomb guard checked from the header, before any decode). FILE
inputs may be any type. The file names the graph sees are made here, never taken from a
caller unchecked.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from PIL import Image

from runflow_worker.cache.hashing import sha256_file
from runflow_worker.errors import ErrorCode, RunFailure
from runflow_worker.run.contract import INPUTS_SUBDIR, InputDef, InputType
from runflow_worker.run.dirreserve import DirReserve, make_dirs

# MPO (a JPEG with more pictures after the first, as phone cameras write) is a JPEG to
# every reader; ComfyUI's LoadImage takes its first picture.
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif"}
_OPENERS = ["PNG", "JPEG", "WEBP", "GIF"]  # Pillow's JPEG opener also reads MPO
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTENT_HEX = 16
"""Hex digits of a caller file's sha256 in its path (``runflow_inputs/<digest>/<name>``)."""
SMALL_IMAGE_BYTES = 1 << 20
"""An image up to this size is checked from memory (``check_image``)."""
_READ_BYTES = 1 << 16


class FileFetcher(Protocol):
    """Fetches one caller URL to a local file (raising the cache package's errors)."""

    def __call__(self, url: str, dest: Path, *, max_bytes: int,
                 cancel: Callable[[], bool]) -> str | None:
        """Write the body of ``url`` to ``dest``; return its hex sha256 when the fetcher
        hashed what it wrote (else None: the file is hashed after)."""


def safe_filename(url: str, fallback: str) -> str:
    """A harmless basename derived from a URL's path (or ``fallback``, made harmless too)."""
    for candidate in (unquote(urlsplit(url).path.rsplit("/", 1)[-1]), fallback):
        name = _SAFE.sub("_", candidate).strip("._")[:100]
        if name:
            return name
    return "input"


def input_name(input_id: str) -> str:
    """The name of one input in its file's name (an image's ``<name><ext>``).

    A plain ``input_id`` (letters, digits, ``._-``, starting with a letter or digit) is its
    own name. Any other gets a name made from it and its hash, starting with ``_`` so it
    can never equal a plain one: two ids never share a name, and none can climb out.
    """
    if _PLAIN.fullmatch(input_id):
        return input_id
    digest = hashlib.sha256(input_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"_{_SAFE.sub('_', input_id).strip('._')[:40]}-{digest}"


def _read_small(path: Path | str, limit: int) -> bytes | None:
    """The whole file when it holds at most ``limit`` bytes, else None."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        # Reads of 64 KiB: a 1 MiB buffer would be a map and unmap of its own per read.
        while chunk := os.read(fd, min(_READ_BYTES, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_image(path: Path | str, *, max_pixels: int, field: str) -> str:
    """Verify ``path`` is a PNG/JPEG/WebP/GIF within ``max_pixels``; return its extension."""
    try:
        # A small file (the usual caller's image) is read whole and parsed from memory:
        # four system calls, where Pillow's file object made nine (a terminal query and
        # four seeks among them).
        data = _read_small(path, SMALL_IMAGE_BYTES)
        source: Path | str | io.BytesIO = path if data is None else io.BytesIO(data)
        with warnings.catch_warnings():
            # Pillow's own bomb warning is replaced by our explicit limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=_OPENERS) as im:
                fmt = im.format or ""
                width, height = im.size
                frames = getattr(im, "n_frames", 1) or 1
    except Image.DecompressionBombError as exc:
        raise RunFailure(ErrorCode.INVALID_INPUT, f"{field}: image is too large ({exc})",
                         details={"fields": [field]}) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RunFailure(ErrorCode.INVALID_INPUT,
                         f"{field}: not a PNG, JPEG, WebP or GIF image",
                         details={"fields": [field]}) from exc
    if fmt not in IMAGE_FORMATS:
        raise RunFailure(ErrorCode.INVALID_INPUT, f"{field}: image format {fmt} not accepted",
                         details={"fields": [field]})
    pixels = width * height * frames
    if pixels > max_pixels:
        raise RunFailure(
            ErrorCode.INVALID_INPUT,
            f"{field}: {width}x{height}x{frames} frames exceeds the {max_pixels} pixel limit",
            details={"fields": [field]},
        )
    return IMAGE_FORMATS[fmt]


def materialise_inputs(
    defs: dict[str, InputDef],
    values: dict[str, Any],
    input_dir: Path,
    fetch: FileFetcher,
    *,
    max_bytes: int,
    max_pixels: int,
    cancel: Callable[[], bool],
    reserve: DirReserve | None = None,
) -> dict[str, str]:
    """Fetch every IMAGE/FILE value into ``input_dir``; return ``input_id -> relative name``
    (``runflow_inputs/<content>/<name>``: ``docs/runtime.md``, "Input rewriting").

    ``reserve``: where the new folders come from (``run.dirreserve``), else ``mkdir``.
    """
    files: dict[str, str] = {}
    # Paths as strings (the fetch aside, which takes a ``Path``): a dozen pathlib steps
    # were a good part of this function's own time on every run with a file input.
    base = os.fspath(input_dir)
    folder = os.path.join(base, INPUTS_SUBDIR)
    for input_id, d in defs.items():
        if d.type not in (InputType.IMAGE, InputType.FILE) or input_id not in values:
            continue
        url = values[input_id]
        field = f"input.{input_id}"
        make_dirs(folder, under=base, reserve=reserve)
        # Fetched to a name of its own, then renamed into place: whatever already stands at
        # the final path (a link to a shared blob, say) is replaced, never written through.
        part = os.path.join(folder, f".{uuid.uuid4().hex}.part")
        if reserve is not None:  # an empty file made ahead (the fetcher opens what is there)
            reserve.take_file(part, under=base, mode=0o600)
        digest = fetch(url, Path(part), max_bytes=max_bytes, cancel=cancel)
        filename = safe_filename(url, "file")
        if d.type is InputType.IMAGE:
            filename = input_name(input_id) + check_image(part, max_pixels=max_pixels,
                                                            field=field)
        # The path names the content: ComfyUI caches a node's outputs by its inputs, so a
        # node reading a path that held another caller's bytes in an earlier run of the warm
        # child would be served that run's result. The fetcher's digest is of the bytes it
        # wrote into ``part`` (the run's staged input, out of the child's sight). Two inputs
        # share a folder only with the same bytes; one path for both means the same file.
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            digest = sha256_file(Path(part))
        content = digest[:CONTENT_HEX]
        make_dirs(os.path.join(folder, content), under=base, reserve=reserve)
        os.replace(part, os.path.join(folder, content, filename))
        files[input_id] = f"{INPUTS_SUBDIR}/{content}/{filename}"
    return files
