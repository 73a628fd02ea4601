"""A built environment holds bytecode for its Python files (``cache.bytecode``): the child
reads its environment read-only and never writes bytecode, so without it every start
compiled ComfyUI, its custom nodes and their packages from source."""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.cache.bytecode import compile_argv, compiler_environment
from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.errors import EnvironmentBuildError
from runflow_worker.cache.installer import UV, find_uv
from tests.support.gitrepos import COMFY, NODE, Origins, commit

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def valid_bytecode(source: Path) -> bool:
    """Whether this interpreter will run ``source`` from its cached bytecode: the file exists
    and its header matches the source's modification time and size (PEP 552, timestamp
    mode), the check the import system makes."""
    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.is_file():
        return False
    header = cached.read_bytes()[:16]
    magic, flags, mtime, size = header[:4], *struct.unpack("<III", header[4:16])
    st = source.stat()
    return (magic == importlib.util.MAGIC_NUMBER and flags == 0
            and mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF)


def test_the_checkout_its_custom_nodes_and_installed_packages_get_bytecode(
    tmp_path: Path
) -> None:
    origins = Origins(tmp_path)
    # A Python 2 file in a pack: it does not compile, and the build goes on without it.
    broken = commit(origins.node, {"legacy.py": 'print "python 2"\n', "sub/deep.py": "X = 1\n"})
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE, broken),))
    env = origins.environments(tmp_path).prepare(spec)
    node = env.custom_nodes_dir / "ComfyUI-Foo"
    for source in (env.comfyui_dir / "main.py", node / "__init__.py", node / "sub" / "deep.py"):
        assert valid_bytecode(source), source
    assert not valid_bytecode(node / "legacy.py")
    installed = [p for path in env.sys_path if path.exists()
                 for p in path.rglob("*.py") if "tinydep" in p.parts]
    assert installed and all(valid_bytecode(p) for p in installed)


@pytest.mark.skipif(find_uv() is None, reason="uv is not installed")
def test_what_uv_installs_gets_bytecode_too(tmp_path: Path) -> None:
    # uv, unlike pip, compiles nothing itself.
    origins = Origins(tmp_path)
    spec = EnvironmentSpec(COMFY, origins.comfy_v1, (NodePin("ComfyUI-Foo", NODE,
                                                             origins.node_v1),))
    env = origins.environments(tmp_path, installer=UV, uv_bin=find_uv()).prepare(spec)
    installed = [p for path in env.sys_path if path.exists()
                 for p in path.rglob("*.py") if "tinydep" in p.parts]
    assert installed and all(valid_bytecode(p) for p in installed)


def test_a_read_only_child_runs_the_bytecode_the_build_left(tmp_path: Path) -> None:
    # As in the child's sandbox (PYTHONDONTWRITEBYTECODE): the import takes the build's
    # bytecode, not the source. Proof: bytecode of other code under the same header runs.
    origins = Origins(tmp_path)
    env = origins.environments(tmp_path).prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    cached = Path(importlib.util.cache_from_source(str(env.comfyui_dir / "main.py")))
    header = cached.read_bytes()[:16]
    cached.write_bytes(header + marshal.dumps(compile("VERSION = 99\n", "main.py", "exec")))
    out = subprocess.run([sys.executable, "-c", "import main; print(main.VERSION)"],
                         cwd=env.comfyui_dir, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, check=True)
    assert out.stdout.strip() == "99"


def test_the_compiler_runs_through_the_build_sandbox(tmp_path: Path) -> None:
    # The sandbox is a command prefix; this one logs what it is given, then runs it.
    log = tmp_path / "wrapped.jsonl"
    prefix = tmp_path / "prefix.py"
    prefix.write_text("import json, os, sys\n"
                      f"with open({str(log)!r}, 'a') as fh:\n"
                      "    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "os.execv(sys.argv[1], sys.argv[1:])\n")
    origins = Origins(tmp_path)
    envs = origins.environments(tmp_path, sandbox=lambda env_dir, env, cwd: [sys.executable,
                                                                          str(prefix)])
    env = envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[1:3] for c in commands] == [["-m", "compileall"]]
    assert commands[0][-1] == str(env.comfyui_dir)  # no prefix without requirements
    assert valid_bytecode(env.comfyui_dir / "main.py")


def test_a_compiler_that_cannot_run_fails_the_build(tmp_path: Path) -> None:
    origins = Origins(tmp_path)
    envs: Environments = origins.environments(tmp_path, python=str(tmp_path / "no-python"))
    with pytest.raises(EnvironmentBuildError, match="compile bytecode"):
        envs.prepare(EnvironmentSpec(COMFY, origins.comfy_v1))
    assert not (envs.root / EnvironmentSpec(COMFY, origins.comfy_v1).key).exists()


def test_the_compiler_gets_no_credential_and_no_source_date_epoch() -> None:
    env = compiler_environment({"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "s",
                                "RUNFLOW_REDIS_URL": "redis://:pw@h", "SOURCE_DATE_EPOCH": "1",
                                "LANG": "C.UTF-8"})
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    argv = compile_argv("/usr/bin/python3", [Path("/e/ComfyUI"), Path("/e/python")])
    assert argv[:3] == ["/usr/bin/python3", "-m", "compileall"]
    assert argv[-2:] == ["/e/ComfyUI", "/e/python"]
