"""The settings object: parsing from the environment, and the README documents every field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import GpuClass, Settings, parse_ladder

README = Path(__file__).parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [f"RUNFLOW_{name.upper()}" for name in Settings.model_fields
               if f"`RUNFLOW_{name.upper()}`" not in text]
    assert missing == []


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNFLOW_URL_ALLOW", "127.0.0.1/32, files.internal")
    monkeypatch.setenv("RUNFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RUNFLOW_GPU_LADDER", "cpu:0,l4:24,h100:80")
    monkeypatch.setenv("RUNFLOW_LEASE_S", "5")
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    s = Settings()
    assert s.url_allow == ("127.0.0.1/32", "files.internal")
    assert s.ladder == (GpuClass("cpu", 0), GpuClass("l4", 24), GpuClass("h100", 80))
    assert s.lease_s == 5 and s.blobs_dir == tmp_path / "blobs"
    assert s.effective_storage_url == (tmp_path / "outputs").resolve().as_uri()
    assert "c2VjcmV0" not in repr(s)  # secrets never printed
    with pytest.raises(ValidationError):
        s.lease_s = 3  # frozen


@pytest.mark.parametrize("bad", ["", "l4", "l4:x", "l4:24,l4:24"])
def test_bad_ladders(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ladder(bad)


def test_bad_values_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNFLOW_MAX_DELIVERIES", "0")
    with pytest.raises(ValidationError):
        Settings()
