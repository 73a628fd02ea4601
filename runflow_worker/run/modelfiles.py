"""A run's models and resources: fetched while its environment starts, linked once its own
ComfyUI child is there.

Two steps because of where the links go: ``links/<run>/`` (``run.rundirs``), bound
read-only into the warm child. Until the run has acquired its child
(``RunnerSupervisor.acquire``), the warm child may be the previous run's, another owner's,
which would see this run's models the moment they were linked. So the blobs are fetched
(downloaded, or proved for another owner's private blob) in parallel with the environment
phase, and hard-linked only after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runflow_worker.errors import ErrorCode
from runflow_worker.run import contract as c
from runflow_worker.run.failures import StopCheck, run_failures
from runflow_worker.run.rundirs import RunPaths


class ModelStore(Protocol):
    """The part of the blob store a run uses (``cache.blobs.BlobStore``)."""

    def ensure_many(self, items: Any, *, owner: str | None = None, max_parallel: int,
                    progress: Callable[[str, int, int | None], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> dict[str, Path]: ...

    def hardlink(self, sha256: str, dest: Path, *, base: Path | None = None) -> Path: ...

    def usable(self, sha256: str, owner: str | None) -> bool: ...

    def pin(self, digests: Any) -> Any: ...


@dataclass(frozen=True)
class WantedBlob:
    """One blob a run needs and where it is linked."""

    field: str
    """The message field naming it (``workflow.models.<key>``)."""
    sha256: str
    sources: list[str]
    size_bytes: int | None
    dest: Path
    """Its link: ``links/<run>/models/<key>`` or ``links/<run>/input/<key>``."""
    base: Path
    """The links directory ``dest`` must stay inside."""
    resource: bool


def wanted_blobs(workflow: c.DeployedWorkflow, run: RunPaths) -> list[WantedBlob]:
    """The blobs ``workflow`` names (models, then resources) and their links in ``run``."""
    models, resources = run.links / "models", run.links / "input"
    wanted = [WantedBlob(f"workflow.models.{key}", ref.sha256.lower(),
                         [ref.url] if ref.url else [], ref.size_bytes, models / key, models,
                         False)
              for key, ref in workflow.models.items()]
    for key, res in workflow.resources.items():
        sources = [res.url] if res.url else []
        if res.asset_id:
            sources.append(f"runflow://assets/{res.asset_id}")
        wanted.append(WantedBlob(f"workflow.resources.{key}", res.sha256.lower(), sources,
                                 res.size_bytes, resources / key, resources, True))
    return wanted


def fetch_blobs(blobs: ModelStore, wanted: list[WantedBlob], owner: str | None, *,
                max_parallel: int, progress: Callable[[str, int, int | None], None],
                stop_reason: StopCheck) -> None:
    """Have every wanted blob in the store for a run of ``owner`` (another owner's private
    blob only after this run's source proved it); MODEL_FETCH_FAILED naming the fields, or
    the stop's ``RunInterrupted``."""
    from runflow_worker.cache.blobs import BlobRequest

    with _blob_failures(blobs, wanted, owner, stop_reason):
        blobs.ensure_many([BlobRequest(w.sha256, w.sources, w.size_bytes) for w in wanted],
                          owner=owner, max_parallel=max_parallel, progress=progress,
                          cancel=lambda: stop_reason() is not None)


def link_blobs(blobs: ModelStore, wanted: list[WantedBlob], run: RunPaths,
               owner: str | None) -> None:
    """Hard-link each fetched blob at its exact path in the run's read-only ``links`` (a
    resource also gets a symlink to it in the run's staged input directory, where ComfyUI
    looks for it by key). Only once the run's own child is acquired (module docstring)."""
    with _blob_failures(blobs, wanted, owner, lambda: None):  # a link is never canceled
        for w in wanted:
            blobs.hardlink(w.sha256, w.dest, base=w.base)
            if w.resource:
                _symlink_resource(w.dest, run.staged("input") / w.dest.relative_to(w.base))


def _blob_failures(blobs: ModelStore, wanted: list[WantedBlob], owner: str | None,
                   stop_reason: StopCheck) -> AbstractContextManager[None]:
    """The store's failures as MODEL_FETCH_FAILED naming the fields (``run.failures``)."""

    def blame() -> tuple[str, dict[str, Any]]:
        # Only what this owner may have counts as present: a failed proof of another
        # owner's blob names its field like a failed download.
        missing = [w.field for w in wanted if not blobs.usable(w.sha256, owner)] or [
            w.field for w in wanted]
        return f"{', '.join(missing)}: ", {"fields": missing}

    return run_failures(stop_reason, ErrorCode.MODEL_FETCH_FAILED, blame=blame)


def _symlink_resource(target: Path, link: Path) -> None:
    """A symlink at ``link`` (in the run's staged input directory) to the resource's hard
    link ``target``: the same absolute path inside the sandbox and out."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)
