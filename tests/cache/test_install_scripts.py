"""Custom nodes' install.py scripts run as ComfyUI-Manager runs them, with the pip they start
held to the environment's prefix and the image's versions, and without the worker's secrets."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.errors import BuildCanceled, EnvironmentBuildError
from runflow_worker.cache.git import GitMirrors
from tests.support.gitrepos import commit, make_repo, make_wheel

pytestmark = pytest.mark.timeout(120)

COMFY = "https://git.example/comfyanonymous/ComfyUI"
NODE = "https://git.example/acme/ComfyUI-Foo"

# Writes what it saw, then installs a package the way node scripts do: pip on sys.executable.
RECORDING_SCRIPT = """\
import os, subprocess, sys
with open("seen.txt", "w") as f:
    f.write(os.getcwd() + "\\n" + os.environ.get("COMFYUI_PATH", "") + "\\n"
            + os.environ.get("RUNFLOW_REDIS_URL", "<unset>") + "\\n")
subprocess.check_call([sys.executable, "-m", "pip", "install", "scriptdep==1.0"])
"""


class Setup:
    def __init__(self, root: Path) -> None:
        self.comfy = make_repo(root / "origins" / "ComfyUI")
        self.comfy_v1 = commit(self.comfy, {"main.py": "VERSION = 1\n"})
        self.node = make_repo(root / "origins" / "ComfyUI-Foo")
        self.wheels = root / "wheels"
        make_wheel(self.wheels, "scriptdep", "1.0", "VALUE = 'installed by install.py'\n")
        # An old version of a package the image has: only a changed image could take it.
        make_wheel(self.wheels, "pytest", "0.1", "\n")
        self.envs = Environments(root / "cache" / "envs",
                                 GitMirrors(root / "cache" / "git",
                                            {COMFY: self.comfy, NODE: self.node}),
                                 pip_index_url=None, pip_find_links=(str(self.wheels),))

    def spec(self, files: dict[str, str], install_scripts: bool = True) -> EnvironmentSpec:
        node_commit = commit(self.node, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n", **files})
        return EnvironmentSpec(COMFY, self.comfy_v1, (NodePin("ComfyUI-Foo", NODE, node_commit),),
                               install_scripts=install_scripts)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing from a package index in tests
    monkeypatch.setenv("RUNFLOW_REDIS_URL", "redis://:secret@redis.internal:6379/0")
    return Setup(tmp_path)


def test_install_script_runs_in_the_node_directory_and_installs_into_the_prefix(
    setup: Setup
) -> None:
    env = setup.envs.prepare(setup.spec({"install.py": RECORDING_SCRIPT}))
    node = env.custom_nodes_dir / "ComfyUI-Foo"
    cwd, comfyui_path, secret = (node / "seen.txt").read_text().splitlines()
    assert Path(cwd) == node and Path(comfyui_path) == env.comfyui_dir
    assert secret == "<unset>"  # the worker's credentials stay with the worker
    code = "import scriptdep; print(scriptdep.__file__); print(scriptdep.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(map(str, env.sys_path))}, check=True,
                         timeout=60).stdout.splitlines()
    assert out[0].startswith(str(env.root / "python")) and out[1] == "installed by install.py"
    assert importlib.util.find_spec("scriptdep") is None  # the image did not change


def test_install_script_gets_no_proxy_password_but_pips_own_settings(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pass@proxy.invalid:3128")  # a credential
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://user:tok@index.invalid/simple")
    script = ("import json, os\n"
              "with open('seen.json', 'w') as f:\n"
              "    json.dump(dict(os.environ), f)\n")
    env = setup.envs.prepare(setup.spec({"install.py": script}))
    seen = json.loads((env.custom_nodes_dir / "ComfyUI-Foo" / "seen.json").read_text())
    assert "HTTPS_PROXY" not in seen and "RUNFLOW_REDIS_URL" not in seen
    assert seen["HTTP_PROXY"] == "http://proxy.invalid:3128"
    # pip's own settings, as for the requirements: pip needs its index credentials
    assert seen["PIP_EXTRA_INDEX_URL"] == "https://user:tok@index.invalid/simple"
    assert seen["PIP_NO_INDEX"] == "1"


def test_install_script_cannot_change_a_package_of_the_image(setup: Setup) -> None:
    script = ("import subprocess, sys\n"
              "subprocess.check_call([sys.executable, '-m', 'pip', 'install', 'pytest==0.1'])\n")
    spec = setup.spec({"install.py": script})
    with pytest.raises(EnvironmentBuildError, match="install.py of ComfyUI-Foo failed"):
        setup.envs.prepare(spec)
    assert not (setup.envs.root / spec.key).exists()
    assert importlib.util.find_spec("pytest") is not None


def test_a_failing_install_script_fails_the_build_with_its_output(setup: Setup) -> None:
    spec = setup.spec({"install.py": "import sys\nsys.exit('no compiler for the kernels')\n"})
    with pytest.raises(EnvironmentBuildError, match="no compiler for the kernels") as info:
        setup.envs.prepare(spec)
    assert "exit code 1" in str(info.value)
    assert not (setup.envs.root / spec.key).exists()


def test_cancel_stops_an_install_script(setup: Setup, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = (f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\n"
              "time.sleep(600)\n")  # a script that would hold the build for minutes
    spec = setup.spec({"install.py": script})
    with pytest.raises(BuildCanceled):
        setup.envs.prepare(spec, cancel=started.exists)  # canceled once it is running
    assert not (setup.envs.root / spec.key).exists()


def test_scripts_run_only_when_the_operator_turns_them_on(setup: Setup) -> None:
    env = setup.envs.prepare(setup.spec({"install.py": RECORDING_SCRIPT}, install_scripts=False))
    node = env.custom_nodes_dir / "ComfyUI-Foo"
    assert (node / "install.py").is_file() and not (node / "seen.txt").exists()


def test_the_option_is_in_the_key_only_when_on() -> None:
    spec = EnvironmentSpec(COMFY, "c" * 40, (NodePin("A", NODE, "a" * 40),),
                           python="3.11.7", torch="2.13.0")
    # The key this spec had before the option existed: volumes keep their environments.
    assert spec.key == "8019fe4a40319a74c616c23d"
    assert dataclasses.replace(spec, install_scripts=True).key != spec.key


def test_a_script_that_changes_the_image_fails_the_build(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package of the image, on the worker's path; the script removes it as a
    # `pip uninstall` run where the image is writable would.
    image = tmp_path / "image-site"
    dist = image / "imagepkg-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: imagepkg\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(image))
    script = f"import shutil\nshutil.rmtree({str(dist)!r})\n"
    spec = setup.spec({"install.py": script})
    with pytest.raises(EnvironmentBuildError,
                       match=r"imagepkg 1\.0 removed\) while running install.py of ComfyUI-Foo"):
        setup.envs.prepare(spec)
    assert not (setup.envs.root / spec.key).exists()
