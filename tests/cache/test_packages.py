"""Installed package versions, and their comparison with a deployment's list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runflow_worker.cache.packages import (
    PackageDifference,
    built_versions,
    installed_versions,
    package_differences,
)
from runflow_worker.run.contract import parse_message
from runflow_worker.run.envreport import EnvironmentReport
from runflow_worker.runtime.runner import RunnerConfig
from tests.fakes import FAKE_CHILD
from tests.support.factories import message, workflow


def _dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_installed_versions_first_on_the_path_wins(tmp_path: Path) -> None:
    env, image = tmp_path / "env", tmp_path / "image"
    _dist(env, "Foo_Bar", "2.0")
    _dist(image, "foo-bar", "1.0")
    _dist(image, "Other.Pkg", "3.1")
    assert installed_versions([str(env), str(image)]) == {"foo-bar": "2.0", "other-pkg": "3.1"}
    assert installed_versions([str(image), str(env)])["foo-bar"] == "1.0"


def test_differences_by_pep440_and_canonical_names() -> None:
    installed = {"numpy": "1.26.4", "torch": "2.5.1+cu124", "foo-bar": "2.1.0",
                 "odd": "build-7", "same": "1.0"}
    deployed = [
        ("numpy", "2.1.0"),          # another version
        ("Foo_Bar", "2.1"),          # 2.1 == 2.1.0, and the names are one package
        ("torch", "2.5.1+cu121"),    # a local label is part of the version
        ("odd", "build-8"),          # not PEP 440: compared as strings
        ("same", "1.0"),
        ("missing", "1.0"),          # not installed here: left out
        ("numpy", "2.1.0"),          # listed twice: reported once
        ("unversioned", None),
    ]
    assert package_differences(deployed, installed) == [
        PackageDifference("numpy", "2.1.0", "1.26.4"),
        PackageDifference("odd", "build-8", "build-7"),
        PackageDifference("torch", "2.5.1+cu121", "2.5.1+cu124"),
    ]
    assert package_differences([("torch", "2.5.1+cu124"), ("odd", "build-7")], installed) == []


@pytest.mark.timeout(20)
def test_a_builds_packages_are_read_from_their_names_never_their_files(tmp_path: Path) -> None:
    """An environment's site-packages are what hostile build code left: a METADATA that is
    a FIFO would block the worker for good, one that links to a worker's file would have
    the worker read that file into a run's record."""
    env, image = tmp_path / "env", tmp_path / "image"
    secret = tmp_path / "secret"
    secret.write_text("Name: linked\nVersion: SECRET-VALUE\n")
    (env / "blocking-1.0.dist-info").mkdir(parents=True)
    os.mkfifo(env / "blocking-1.0.dist-info" / "METADATA")
    (env / "linked-2.0.dist-info").mkdir()
    (env / "linked-2.0.dist-info" / "METADATA").symlink_to(secret)
    _dist(env, "Foo_Bar", "2.0+cu1")
    _dist(image, "foo-bar", "1.0")
    _dist(image, "other", "3.1")
    assert built_versions([str(env)]) == {"blocking": "1.0", "linked": "2.0",
                                          "foo-bar": "2.0+cu1"}
    report = EnvironmentReport()
    config = RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path),
                          extra_sys_path=(str(env),), child_entry=FAKE_CHILD,
                          startup_timeout_s=60)
    wf = workflow()
    wf["environment"]["packages"] = [{"name": "linked", "version": "9"},
                                     {"name": "blocking", "version": "9"}]
    msg = parse_message(message(wf=wf))
    environment, _ = report.describe(msg, config, None, tmp_path)
    assert environment["package_differences"] == [
        {"name": "blocking", "deployed": "9", "here": "1.0"},
        {"name": "linked", "deployed": "9", "here": "2.0"}]
