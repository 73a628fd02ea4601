"""The certificate authorities the worker trusts for https: public roots plus the operator's.

``CATrust`` is certifi's bundle (the public roots, the same on every machine) plus extra PEM
files and hashed certificate directories: ``RUNFLOW_CA_BUNDLE``, and the system's
``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` (the OpenSSL convention that curl, pip, httpx and
requests follow, and how clusters inject a corporate CA). The extras add to the public
roots; they never replace them. The worker passes the paths in; this package does not read
the environment.

The fetcher (downloads, callbacks) takes the ``ssl_context``; git, whose CA file replaces its
default set, gets ``pem_text`` written to a file plus the directories as its CA path.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import certifi


@dataclass(frozen=True)
class CATrust:
    """Public roots plus ``files`` (PEM bundles) and ``dirs`` (``c_rehash`` directories)."""

    files: tuple[Path, ...] = ()
    dirs: tuple[Path, ...] = ()

    @classmethod
    def of(cls, value: CATrust | Path | str | None) -> CATrust:
        """``value`` as a CATrust: itself, one extra PEM file, or nothing extra."""
        if isinstance(value, CATrust):
            return value
        return cls(files=(Path(value),) if value is not None else ())

    @classmethod
    def from_paths(cls, files: Iterable[Path | str | None],
                   dir_lists: Iterable[str | None]) -> CATrust:
        """Trust built as OpenSSL reads ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``: ``dir_lists`` are
        ``os.pathsep``-separated lists; paths that do not exist are skipped, as OpenSSL
        skips them."""
        found_files = tuple(Path(f) for f in files if f and Path(f).is_file())
        found_dirs = tuple(Path(d) for spec in dir_lists if spec
                           for d in spec.split(os.pathsep) if d and Path(d).is_dir())
        return cls(files=found_files, dirs=found_dirs)

    def __bool__(self) -> bool:
        return bool(self.files or self.dirs)

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context with every trusted authority loaded.

        Raises ``ssl.SSLError`` when an extra file holds no usable certificate.
        """
        ctx = ssl.create_default_context(cafile=certifi.where())
        for path in self.files:
            ctx.load_verify_locations(cafile=str(path))
        for path in self.dirs:
            # Looked up by subject hash at verification time, as OpenSSL does.
            ctx.load_verify_locations(capath=str(path))
        return ctx

    def pem_text(self) -> str:
        """certifi's bundle followed by the extra files: one CA file for tools (git) whose CA
        file replaces their defaults."""
        parts = [Path(certifi.where()).read_text()]
        parts.extend(path.read_text() for path in self.files)
        return "\n".join(parts)

    def capath(self) -> str | None:
        """The directories as one OpenSSL/curl CA path (``:``-separated), or None."""
        return os.pathsep.join(str(d) for d in self.dirs) or None
