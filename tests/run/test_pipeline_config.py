"""``PipelineConfig`` has the settings' defaults, read from ``Settings``, never retyped."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from runflow_worker.run.assembly import build_pipeline
from runflow_worker.run.pipeline import PipelineConfig
from runflow_worker.settings import ENV_PREFIX, Settings

pytestmark = pytest.mark.timeout(30)


def _unset() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def test_a_config_built_by_hand_has_the_settings_defaults(tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, _unset(), clear=True):
        settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=tmp_path)
        pipeline = build_pipeline(settings)
    try:
        built = pipeline.config
    finally:
        pipeline.close()
    by_hand = PipelineConfig(work_dir=built.work_dir, comfyui_dir=built.comfyui_dir,
                             cpu=built.cpu, sandbox_hidden=built.sandbox_hidden)
    assert by_hand == built


def test_the_defaults_do_not_follow_the_environment(tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, {"RUNFLOW_INPUT_MAX_BYTES": "5",
                                      "RUNFLOW_SANDBOX": "none"}):
        config = PipelineConfig(work_dir=tmp_path, comfyui_dir=None)
    assert config.input_max_bytes == Settings.model_fields["input_max_bytes"].default
    assert config.sandbox is True
