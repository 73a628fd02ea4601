"""Input fetchers for tests (``run.inputs.FileFetcher``): a ``file://`` URL is copied."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


def url_path(url: str) -> Path:
    """The local path a ``file://`` URL names (an input's, or a stored output's)."""
    return Path(unquote(urlsplit(url).path))


def copy_fetch(url: str, dest: Path, *, max_bytes: int, cancel: Any) -> None:
    """Fetch ``url`` by copying the file it names to ``dest`` (no limit, no cancel)."""
    shutil.copyfile(url_path(url), dest)
