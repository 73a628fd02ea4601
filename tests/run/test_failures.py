"""What stops a run becomes its failure in one place (``run.failures``): every "canceled" of
every layer shares one base and becomes the stop's interruption; each cache error becomes
the code of the phase it ended (a refused git origin ``FORBIDDEN_ORIGIN``)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from runflow_worker.cache import errors as cache_errors
from runflow_worker.cache.errors import CacheError, Canceled
from runflow_worker.errors import (
    ErrorCode,
    RunFailure,
    RunInterrupted,
    RunReleased,
    UploadCanceled,
    WorkerError,
    WorkerUnfit,
)
from runflow_worker.run import storage
from runflow_worker.run.failures import (
    StopReason,
    check_stop,
    interrupted,
    job_failure,
    run_failures,
)
from runflow_worker.run.modelfiles import WantedBlob, fetch_blobs, link_blobs
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import RunnerStartCanceled, RuntimeFailure

pytestmark = pytest.mark.timeout(30)

CANCELS = (cache_errors.FetchCanceled, cache_errors.BuildCanceled, RunnerStartCanceled,
           UploadCanceled)
"""The four "canceled" errors: a fetch, an environment build, a ComfyUI start, an upload."""


def _cache_errors() -> list[type[CacheError]]:
    """Every cache error class but the canceled ones, the base included."""
    found: list[type[CacheError]] = []
    todo: list[type[CacheError]] = [CacheError]
    while todo:
        cls = todo.pop()
        if not issubclass(cls, Canceled):
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def _make(cls: type[CacheError], text: str = "it broke") -> CacheError:
    if cls is cache_errors.HTTPStatusError:
        return cls(text, status_code=503)
    return cls(text)


def stopped(reason: StopReason | None):
    return lambda: reason


# ------------------------------------------------------------------ the canceled base


@pytest.mark.parametrize("cls", CANCELS, ids=lambda cls: cls.__name__)
def test_every_canceled_error_shares_one_base_and_keeps_its_own(cls: type[Exception]) -> None:
    exc = cls("stopped")
    assert isinstance(exc, Canceled)
    own = {cache_errors.FetchCanceled: cache_errors.FetchError,
           cache_errors.BuildCanceled: CacheError,
           RunnerStartCanceled: RuntimeFailure, UploadCanceled: WorkerError}[cls]
    assert isinstance(exc, own)  # its package's hierarchy still holds it
    assert str(exc) == "stopped"


def test_upload_canceled_is_still_the_storage_modules_error() -> None:
    assert storage.UploadCanceled is UploadCanceled


@pytest.mark.parametrize("cls", CANCELS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(("reason", "code", "release"), [
    (StopReason.CANCELED, ErrorCode.CANCELED, False),
    (StopReason.TIMEOUT, ErrorCode.TIMEOUT, False),
    (StopReason.RELEASE, ErrorCode.WORKER_LOST, True),
    (None, ErrorCode.CANCELED, False),  # the stop is gone by now: this run was canceled
])
def test_a_canceled_step_is_the_stops_interruption(cls: type[Exception],
                                                   reason: StopReason | None, code: ErrorCode,
                                                   release: bool) -> None:
    cause = cls("stopped")
    with (pytest.raises(RunInterrupted) as info,
          run_failures(stopped(reason), ErrorCode.MODEL_FETCH_FAILED,
                       blame=lambda: pytest.fail("a cancel blames nothing"))):
        raise cause
    assert info.value.code is code and isinstance(info.value, RunReleased) is release
    assert info.value.__cause__ is cause


# ------------------------------------------------------------------ cache errors


@pytest.mark.parametrize("cls", _cache_errors(), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("code", [ErrorCode.ENVIRONMENT_FAILED, ErrorCode.MODEL_FETCH_FAILED,
                                  ErrorCode.INPUT_FETCH_FAILED])
def test_each_cache_error_is_the_phases_code(cls: type[CacheError], code: ErrorCode) -> None:
    cause = _make(cls)
    with (pytest.raises(RunFailure) as info,
          run_failures(stopped(None), code,
                       blame=lambda: ("building x failed: ", {"env_key": "x"}))):
        raise cause
    failure = info.value
    assert not isinstance(failure, RunInterrupted)
    expected = ErrorCode.FORBIDDEN_ORIGIN if cls is cache_errors.OriginRefused else code
    assert failure.code is expected
    assert failure.message == "building x failed: it broke"
    assert failure.details == {"env_key": "x"}
    assert failure.__cause__ is cause


def test_without_blame_the_message_is_the_errors() -> None:
    with (pytest.raises(RunFailure) as info,
          run_failures(stopped(None), ErrorCode.INPUT_FETCH_FAILED)):
        raise cache_errors.URLRefused("refused https://x.invalid/: no host")
    assert info.value.code is ErrorCode.INPUT_FETCH_FAILED
    assert info.value.message == "refused https://x.invalid/: no host"
    assert info.value.details == {}


def test_without_a_code_only_cancels_are_translated() -> None:
    cause = cache_errors.FetchTimeout("slow")
    with pytest.raises(cache_errors.FetchTimeout) as info, run_failures(stopped(None)):
        raise cause
    assert info.value is cause


@pytest.mark.parametrize("exc", [RunFailure(ErrorCode.INVALID_INPUT, "bad"), ValueError("bug"),
                                 OSError(errno.EACCES, "denied")],
                         ids=["run failure", "bug", "os error"])
def test_anything_else_leaves_as_it_came(exc: Exception, tmp_path: Path) -> None:
    with (pytest.raises(type(exc)) as info,
          run_failures(stopped(None), ErrorCode.ENVIRONMENT_FAILED, full_volume=tmp_path)):
        raise exc
    assert info.value is exc


@pytest.mark.parametrize("exc", [cache_errors.InsufficientDisk("no space"),
                                 OSError(errno.ENOSPC, "No space left on device"),
                                 cache_errors.EnvironmentBuildError("pip failed")],
                         ids=["insufficient disk", "ENOSPC", "build error"])
def test_a_full_volume_makes_the_worker_unfit(exc: Exception, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(exc, cache_errors.EnvironmentBuildError):  # pip saying so in its words
        monkeypatch.setattr("runflow_worker.run.fitness.MIN_FREE_BYTES", 2**62)
    with (pytest.raises(WorkerUnfit) as info,
          run_failures(stopped(None), ErrorCode.ENVIRONMENT_FAILED, full_volume=tmp_path)):
        raise exc
    assert isinstance(info.value, RunReleased) and "the cache volume is full" in info.value.reason
    # Without ``full_volume`` (models, inputs) the same error is the run's.
    if isinstance(exc, CacheError):
        with (pytest.raises(RunFailure) as plain,
              run_failures(stopped(None), ErrorCode.MODEL_FETCH_FAILED)):
            raise exc
        assert plain.value.code is ErrorCode.MODEL_FETCH_FAILED


def test_a_refused_origin_is_the_runs_fault_even_on_a_full_volume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runflow_worker.run.fitness.MIN_FREE_BYTES", 2**62)
    with (pytest.raises(RunFailure) as info,
          run_failures(stopped(None), ErrorCode.ENVIRONMENT_FAILED, full_volume=tmp_path)):
        raise cache_errors.OriginRefused("git origin http://x: not https")
    assert info.value.code is ErrorCode.FORBIDDEN_ORIGIN


# ------------------------------------------------------------------ the model store


class _Store:
    """A blob store whose every call fails with ``error``; ``usable`` digests are present."""

    def __init__(self, error: Exception, usable: set[str] = frozenset()) -> None:
        self.error = error
        self.present = usable

    def ensure_many(self, items, **_: object) -> dict:
        raise self.error

    def hardlink(self, sha256: str, dest: Path, *, base: Path | None = None) -> Path:
        raise self.error

    def usable(self, sha256: str, owner: str | None) -> bool:
        return sha256 in self.present

    def pin(self, digests: object) -> None:
        raise AssertionError("not used")


def _wanted(tmp_path: Path) -> list[WantedBlob]:
    return [WantedBlob(f"workflow.models.{key}", sha * 64, [], None, tmp_path / key, tmp_path,
                       False) for key, sha in (("a", "a"), ("b", "b"))]


def test_a_failed_fetch_names_the_fields_it_left_missing(tmp_path: Path) -> None:
    store = _Store(cache_errors.SourceUnavailable("no source"), usable={"a" * 64})
    with pytest.raises(RunFailure) as info:
        fetch_blobs(store, _wanted(tmp_path), "acme", max_parallel=2,
                    progress=lambda *_: None, stop_reason=stopped(None))
    assert info.value.code is ErrorCode.MODEL_FETCH_FAILED
    assert info.value.message == "workflow.models.b: no source"
    assert info.value.details == {"fields": ["workflow.models.b"]}


def test_a_failed_link_names_every_field_when_all_are_present(tmp_path: Path) -> None:
    store = _Store(cache_errors.UnsafePath("outside"), usable={"a" * 64, "b" * 64})
    with pytest.raises(RunFailure) as info:
        link_blobs(store, _wanted(tmp_path), None, "acme")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.MODEL_FETCH_FAILED
    assert info.value.details == {"fields": ["workflow.models.a", "workflow.models.b"]}


def test_a_canceled_fetch_is_the_stops_interruption(tmp_path: Path) -> None:
    store = _Store(cache_errors.FetchCanceled("transfer canceled"))
    with pytest.raises(RunInterrupted) as info:
        fetch_blobs(store, _wanted(tmp_path), "acme", max_parallel=2,
                    progress=lambda *_: None, stop_reason=stopped(StopReason.TIMEOUT))
    assert info.value.code is ErrorCode.TIMEOUT


# ------------------------------------------------------------------ stops and jobs


def test_check_stop_raises_the_stops_interruption_only_once_stopped() -> None:
    check_stop(stopped(None))
    with pytest.raises(RunInterrupted) as info:
        check_stop(stopped(StopReason.RELEASE))
    assert info.value.code is ErrorCode.WORKER_LOST and isinstance(info.value, RunReleased)
    assert interrupted(StopReason.TIMEOUT).message == "the run exceeded its timeout_s"


@pytest.mark.parametrize(("kind", "code"), [
    (p.FailureKind.INVALID_WORKFLOW, ErrorCode.INVALID_WORKFLOW),
    (p.FailureKind.NODE_ERROR, ErrorCode.NODE_ERROR),
    (p.FailureKind.OUT_OF_MEMORY, ErrorCode.OUT_OF_MEMORY),
    (p.FailureKind.CHILD_DIED, ErrorCode.INTERNAL),
    (p.FailureKind.INTERNAL, ErrorCode.INTERNAL),
    (p.FailureKind.INTERRUPTED, ErrorCode.CANCELED),
])
def test_a_failed_job_is_its_kinds_code(kind: p.FailureKind, code: ErrorCode) -> None:
    failure = job_failure(p.Failed("j", kind, "boom", node_id="3", node_type="KSampler",
                                   exception_type="RuntimeError", details={"x": 1}), None)
    assert failure.code is code
    if code is not ErrorCode.CANCELED:
        assert (failure.message, failure.node_id, failure.node_type) == ("boom", "3",
                                                                         "KSampler")
        assert failure.details == {"x": 1, "exception_type": "RuntimeError"}


def test_a_child_that_died_while_the_run_stopped_is_the_stop() -> None:
    failure = job_failure(p.Failed("j", p.FailureKind.CHILD_DIED, "exit code -9"),
                          StopReason.TIMEOUT)
    assert isinstance(failure, RunInterrupted) and failure.code is ErrorCode.TIMEOUT
