"""Whose fault a failed start is (``run.fitness``), and ``RUNFLOW_DEVICE``."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from runflow_worker.cache.errors import CacheError, InsufficientDisk
from runflow_worker.errors import ConfigError, ErrorCode, WorkerUnfit
from runflow_worker.run import fitness
from runflow_worker.run.contract import parse_message
from runflow_worker.run.gpu import GpuInfo, resolve_device
from runflow_worker.settings import InvalidSettings, Settings
from tests.fakes.control import RecordingControl
from tests.support.factories import message
from tests.support.pipelines import make_pipeline
from tests.support.runners import runner_config

pytestmark = pytest.mark.usefixtures("no_runflow_env")


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_found_behind_other_errors() -> None:
    try:
        try:
            raise _enospc()
        except OSError as exc:
            raise CacheError("building the environment failed") from exc
    except CacheError as wrapped:
        assert fitness.disk_full_error(wrapped)
    assert fitness.disk_full_error(InsufficientDisk("no room after eviction"))
    assert not fitness.disk_full_error(OSError(errno.EACCES, "permission denied"))
    assert not fitness.disk_full_error(None)


def test_disk_problem_from_the_error_or_the_free_space(tmp_path: Path) -> None:
    assert "full" in fitness.disk_problem(tmp_path, _enospc())
    nearly_full = SimpleNamespace(total=2**30, used=2**30 - 4096, free=4096)
    with mock.patch("runflow_worker.run.fitness.shutil.disk_usage", return_value=nearly_full):
        assert "4096 bytes free" in fitness.disk_problem(tmp_path / "not" / "yet")
    roomy = SimpleNamespace(total=2**40, used=0, free=2**40)
    with mock.patch("runflow_worker.run.fitness.shutil.disk_usage", return_value=roomy):
        assert fitness.disk_problem(tmp_path, RuntimeError("a node's own error")) is None


def test_checkout_problem(tmp_path: Path) -> None:
    assert fitness.checkout_problem(None) is None
    assert fitness.checkout_problem(tmp_path) is None
    assert "is missing" in fitness.checkout_problem(tmp_path / "gone")


def test_device_check_passes_on_the_cpu(tmp_path: Path) -> None:
    config = runner_config(tmp_path, cpu=True)
    assert fitness.device_problem(config) is None


def test_device_check_names_unusable_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works on this machine")
    config = runner_config(tmp_path, cpu=False)
    problem = fitness.device_problem(config)
    assert problem is not None and problem.startswith("the GPU (CUDA) is unusable: ")


def test_full_disk_at_the_run_directory_releases_the_run(tmp_path: Path) -> None:
    pl = make_pipeline(tmp_path, cpu=True)
    try:
        with mock.patch.object(pl._run_dirs, "create", side_effect=_enospc()):
            result = pl.execute(parse_message(message()), RecordingControl())
    finally:
        pl.close()
    assert result.released and isinstance(result.failure, WorkerUnfit)
    assert result.failure.code is ErrorCode.WORKER_LOST
    assert "full" in result.unfit


def test_full_disk_during_an_environment_build_releases_the_run(tmp_path: Path) -> None:
    class FullDisk:
        def prepare(self, spec, *, cancel=None):  # noqa: ANN001 - EnvironmentBuilder
            raise InsufficientDisk("insufficient disk space while installing requirements")

        def pin(self, key):  # noqa: ANN001
            from contextlib import nullcontext

            return nullcontext()

    pl = make_pipeline(tmp_path, comfyui_dir=None, cpu=True, environments=FullDisk())
    try:
        result = pl.execute(parse_message(message()), RecordingControl())
    finally:
        pl.close()
    assert result.released and result.unfit and "full" in result.unfit


def test_device_setting() -> None:
    assert Settings().device is None
    assert Settings(device=" CPU ").device == "cpu"
    with pytest.raises(InvalidSettings) as info:
        Settings(device="tpu")
    assert "RUNFLOW_DEVICE: unknown device 'tpu'" in str(info.value)
    with pytest.raises(InvalidSettings) as info:
        Settings(max_unfit_starts=0)
    assert "RUNFLOW_MAX_UNFIT_STARTS" in str(info.value)


def test_resolve_device() -> None:
    l4 = GpuInfo(name="NVIDIA L4", vram_bytes=24 * 2**30)
    with mock.patch("runflow_worker.run.gpu.detect_gpu", return_value=None):
        assert resolve_device(Settings(), "cpu") == "cpu"
        assert resolve_device(Settings(device="cpu"), "l4") == "cpu"
        with pytest.raises(ConfigError) as info:
            resolve_device(Settings(), "l4")
        text = str(info.value)
        assert "'l4' needs a CUDA device" in text and "RUNFLOW_DEVICE=cpu" in text
        assert "\n" not in text
    with mock.patch("runflow_worker.run.gpu.detect_gpu", return_value=l4):
        assert resolve_device(Settings(), "l4") == "cuda"
        assert resolve_device(Settings(device="cuda"), "cpu") == "cuda"


def test_run_and_every_other_pipeline_honour_the_device(tmp_path: Path) -> None:
    from runflow_worker.run.assembly import build_pipeline

    def cpu_of(**values: object) -> bool | None:
        pipeline = build_pipeline(Settings(cache_dir=tmp_path / "cache", **values))
        try:
            return pipeline.config.cpu
        finally:
            pipeline.close()

    assert cpu_of(gpu_class="l4", device="cpu") is True
    assert cpu_of(gpu_class="cpu", device="cuda") is False
    assert cpu_of(gpu_class="cpu") is True
    assert cpu_of(gpu_class="l4") is None  # detection, as before
