"""``runflow-worker doctor`` reports each check and fails when one fails."""

from __future__ import annotations

import argparse
import json
import py_compile
from pathlib import Path

import pytest

from runflow_worker.cli.doctor import doctor_command
from runflow_worker.settings import Settings


def test_doctor_reports_failures_without_secrets(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    checkout = tmp_path / "ComfyUI"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "nodes.py").write_text("")
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=checkout, gpu_class="cpu",
                        redis_url="redis://user:hunter2@127.0.0.1:1/0")
    code = doctor_command(argparse.Namespace(json=True), settings)
    out = capsys.readouterr().out
    results = {r["check"]: r for r in json.loads(out)}
    assert code == 1
    assert results["redis"]["ok"] is False and "hunter2" not in out
    assert results["comfyui"]["ok"] and results["storage"]["ok"] and results["cache"]["ok"]
    assert "serves class cpu" in results["gpu"]["detail"]


def test_doctor_without_a_baked_comfyui(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", gpu_class="cpu")
    doctor_command(argparse.Namespace(json=False), settings)
    out = capsys.readouterr().out
    assert "pinned environment is built under" in out and "FAIL comfyui" not in out
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git to build with
    assert doctor_command(argparse.Namespace(json=False), settings) == 1
    assert "FAIL comfyui  RuntimeError: RUNFLOW_COMFYUI_DIR is not set and git" in (
        capsys.readouterr().out)


def test_doctor_warns_of_a_baked_checkout_without_bytecode(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkout = tmp_path / "ComfyUI"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "nodes.py").write_text("X = 1\n")
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=checkout, gpu_class="cpu")
    doctor_command(argparse.Namespace(json=True), settings)
    comfyui = {r["check"]: r for r in json.loads(capsys.readouterr().out)}["comfyui"]
    assert comfyui["ok"] and comfyui["warning"] and "without bytecode" in comfyui["detail"]
    py_compile.compile(str(checkout / "nodes.py"), doraise=True)
    doctor_command(argparse.Namespace(json=True), settings)
    comfyui = {r["check"]: r for r in json.loads(capsys.readouterr().out)}["comfyui"]
    assert comfyui["ok"] and not comfyui.get("warning")
