"""Linking a blob at the exact path a workflow expects, without ever leaving its directory.

A hard link when the store and the destination share a filesystem, else a symbolic link;
never a copy (a 20 GB checkpoint must not be duplicated per run).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

from runflow_worker.cache.errors import UnsafePath, from_os_error

log = logging.getLogger(__name__)


def link_into(blob: Path, dest: Path, *, base: Path | None = None,
              copy_fallback: bool = False) -> Path:
    """Make ``blob`` appear at ``dest`` (parents created), replacing what is there.

    With ``base``, refuse (``UnsafePath``) a ``dest`` that is or resolves outside it,
    including through a symlinked directory on the way. Where no hard link can be made, a
    symlink to the blob is made, or with ``copy_fallback`` a copy (for a sandbox, where a
    symlink into the store would not resolve).
    """
    dest = Path(os.path.abspath(dest))
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
        base_real = os.path.realpath(base)
        if not (_inside(str(dest), os.path.abspath(base)) or _inside(str(dest), base_real)):
            raise UnsafePath(f"{dest.name} is outside the directory it must stay in")
        # Check the deepest existing ancestor before creating anything: a symlinked
        # directory on the way must not lead the new directories outside the base.
        existing = dest.parent
        while not os.path.lexists(existing):
            existing = existing.parent
        if not _inside(os.path.realpath(existing), base_real):
            raise UnsafePath(f"{dest.name} resolves outside the directory it must stay in")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if base is not None and not _inside(os.path.realpath(dest.parent), base_real):
            raise UnsafePath(f"{dest.name} resolves outside the directory it must stay in")
        _place(blob, dest, copy_fallback)
    except OSError as exc:
        raise from_os_error(exc, f"linking {dest.name}") from exc
    return dest


def _place(blob: Path, dest: Path, copy_fallback: bool = False) -> None:
    """Put a hard link (else a symlink, or a copy) of ``blob`` at ``dest``, replacing what
    is there."""
    try:
        if os.path.samefile(blob, dest):
            return
    except OSError:
        pass  # dest does not exist (or is a broken link): create it
    temp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.link")
    temp.unlink(missing_ok=True)
    try:
        os.link(blob, temp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        if copy_fallback:
            log.warning("cannot hard-link %s (%s): copying it", dest.name, exc.strerror,
                        extra={"event": "link_copied"})
            shutil.copyfile(blob, temp)
        else:
            # Another filesystem (or links refused): point at the blob, by its absolute
            # path (a relative one would resolve from the link's directory).
            os.symlink(os.path.abspath(blob), temp)
    try:
        os.replace(temp, dest)
    except OSError:
        temp.unlink(missing_ok=True)  # dest is a directory, say: leave nothing behind
        raise


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)
