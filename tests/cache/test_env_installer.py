"""Environments built by uv (``cache.installer``): same prefix, constraints and isolation as
pip, the image's packages kept, only the missing requirements installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.cache.environments import EnvironmentSpec, NodePin
from runflow_worker.cache.errors import EnvironmentBuildError
from runflow_worker.cache.installer import (
    PIP,
    UV,
    find_uv,
    image_shadow,
    install_argv,
    prefix_site_dir,
    resolve_installer,
)
from tests.support.gitrepos import COMFY, NODE, Origins, commit

pytestmark = pytest.mark.timeout(120)

UV_BIN = find_uv()
needs_uv = pytest.mark.skipif(UV_BIN is None, reason="uv is not installed (pip install uv)")


@pytest.fixture
def origins(tmp_path: Path) -> Origins:
    return Origins(tmp_path)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Nothing may come from a package index in tests: only --find-links.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("UV_NO_INDEX", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))


def test_argv_of_each_installer(tmp_path: Path) -> None:
    common = {"python": "/py", "prefix": tmp_path / "p", "requirements": [Path("/r.txt")],
              "constraints": Path("/c.txt"), "index_url": "https://idx/simple",
              "find_links": ["/wheels"]}
    uv = install_argv(UV, uv_bin="/bin/uv", **common)
    assert uv[:5] == ["/bin/uv", "pip", "install", "--python", "/py"]
    assert ["--prefix", str(tmp_path / "p")] == uv[5:7]
    assert "--link-mode" in uv and uv[uv.index("--link-mode") + 1] == "copy"
    pip = install_argv(PIP, **common)
    assert pip[:4] == ["/py", "-m", "pip", "install"]
    for argv in (uv, pip):
        for flag, value in (("--constraint", "/c.txt"), ("--requirement", "/r.txt"),
                            ("--index-url", "https://idx/simple"), ("--find-links", "/wheels")):
            assert argv[argv.index(flag) + 1] == value


def test_choice_of_installer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runflow_worker.cache.installer.find_uv", lambda: "/opt/uv")
    assert resolve_installer(None) == (UV, "/opt/uv")  # uv where it is installed
    assert resolve_installer("PIP") == (PIP, None)
    monkeypatch.setattr("runflow_worker.cache.installer.find_uv", lambda: None)
    assert resolve_installer(None) == (PIP, None)
    with pytest.raises(ValueError, match="uv is not installed"):
        resolve_installer("uv")
    with pytest.raises(ValueError, match="unknown installer"):
        resolve_installer("conda")


def test_the_shadow_is_removed_whatever_happens(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    with pytest.raises(RuntimeError), image_shadow(prefix) as names:
        assert "pytest" in names
        assert any(p.name.startswith("pytest-") for p in prefix_site_dir(prefix).iterdir())
        raise RuntimeError("the install failed")
    assert list(prefix_site_dir(prefix).iterdir()) == []


@needs_uv
def test_uv_installs_only_what_the_image_lacks(origins: Origins, tmp_path: Path) -> None:
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE,
                                                             origins.node_v1),))
    env = origins.environments(tmp_path, installer=UV, uv_bin=UV_BIN).prepare(spec)
    # tinydep from the local wheel; pytest, which the image has, not installed again.
    code = "import tinydep, pytest; print(tinydep.VALUE); print(pytest.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(map(str, env.sys_path))}, check=True,
                         timeout=60).stdout.splitlines()
    assert out[0] == "from the environment"
    assert not out[1].startswith(str(env.root))
    installed = sorted(p.name for path in env.sys_path if path.exists() for p in path.iterdir())
    assert [n for n in installed if n.endswith(".dist-info")] == ["tinydep-1.0.dist-info"]
    assert json.loads((env.root / "environment.json").read_text())["installer"] == UV
    assert spec.key == EnvironmentSpec(COMFY, origins.comfy_v1, spec.custom_nodes).key


@needs_uv
def test_uv_refuses_a_requirement_against_the_image(origins: Origins, tmp_path: Path) -> None:
    bad = commit(origins.node, {"requirements.txt": "pytest<1\n"}, "pin an old pytest")
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE, bad),))
    with pytest.raises(EnvironmentBuildError, match=r"ComfyUI-Foo failed \(uv;") as info:
        origins.environments(tmp_path, installer=UV, uv_bin=UV_BIN).prepare(spec)
    assert "pytest" in str(info.value)
    assert not (tmp_path / "cache" / "envs" / spec.key).exists()
