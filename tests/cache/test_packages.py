"""Installed package versions, and their comparison with a deployment's list."""

from __future__ import annotations

from pathlib import Path

from cache.packages import PackageDifference, installed_versions, package_differences


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
