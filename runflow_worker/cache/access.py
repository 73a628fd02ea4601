"""Who may be handed a blob: the store's record of where each digest's bytes were shown.

A blob first obtained from a private source (an S3 object, a Runflow asset, a URL that needs
credentials) is materialised for a run of another owner only once that run's own source has
shown it holds the same bytes (SPEC §9); bytes a public source gave are everyone's. The
store keeps, per digest, a directory of empty marker files::

    access/<64 hex>/public          a public source gave these bytes: any run may have them
    access/<64 hex>/owner-<32 hex>  a source of this owner gave them (sha256 of the name)
    access/<64 hex>/anonymous       a source of a run without owner gave them

Each marker is a fact about the digest, not about the file: it stays true whatever happens
to the blob, so markers are written before a blob is published and never need a
transaction (creating an empty file is atomic). A blob without any marker (a store written
before these records, a marker lost in a crash) is served to nobody until a run's source
proves it: the records fail closed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PUBLIC = "public"
ANONYMOUS = "anonymous"


def marker_name(owner: str | None) -> str:
    """The marker file of ``owner`` (None: a run without owner). Hashed: an owner name is
    never a path."""
    if owner is None:
        return ANONYMOUS
    return "owner-" + hashlib.sha256(owner.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Access:
    """What the record of one digest says: public, and how many owners have shown it."""

    public: bool
    owners: int

    @property
    def recorded(self) -> bool:
        """False when nothing is known of the digest (served to nobody without a proof)."""
        return self.public or self.owners > 0


class AccessRecords:
    """The marker directories under ``directory`` (``<cache>/blobs/access``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _dir(self, digest: str) -> Path:
        return self.directory / digest

    def allows(self, digest: str, owner: str | None) -> bool:
        """Whether a run of ``owner`` may be handed the blob without a proof."""
        d = self._dir(digest)
        return (d / PUBLIC).exists() or (d / marker_name(owner)).exists()

    def record(self, digest: str, owner: str | None, *, private: bool) -> None:
        """Note that a source of ``owner`` (``private``) or a public source gave the bytes."""
        d = self._dir(digest)
        d.mkdir(exist_ok=True)
        name = marker_name(owner) if private else PUBLIC
        os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT, 0o644))

    def describe(self, digest: str) -> Access:
        """The record of ``digest``."""
        try:
            names = os.listdir(self._dir(digest))
        except FileNotFoundError:
            return Access(False, 0)
        return Access(PUBLIC in names, sum(1 for n in names if n != PUBLIC))

    def forget(self, digest: str) -> None:
        """Remove the record of ``digest`` (its blob was evicted; the caller holds its
        eviction lock, so no download or proof of it is under way)."""
        shutil.rmtree(self._dir(digest), ignore_errors=True)

    def digests(self) -> list[str]:
        """Every digest with a record."""
        try:
            return sorted(n for n in os.listdir(self.directory) if len(n) == 64)
        except FileNotFoundError:
            return []
