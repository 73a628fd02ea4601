"""The layers hold: cli -> serve -> run -> runtime -> cache, nothing imports upward
(import-linter).

The contract is ``[tool.importlinter]`` in pyproject.toml. A second run with the layers in
the wrong order must fail, so the check is known to look at the real imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*config: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports_command as c; c(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *config], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_project_layers_are_kept() -> None:
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_contract_against_the_real_imports_is_broken(tmp_path: Path) -> None:
    upside_down = tmp_path / "upside-down.ini"
    upside_down.write_text(
        "[importlinter]\nroot_packages =\n    runflow_worker\n"
        "[importlinter:contract:1]\nname = upside down\ntype = layers\n"
        "containers =\n    runflow_worker\n"
        "layers =\n    cache\n    runtime\n    run\n    serve\n    cli\n")
    done = lint_imports("--config", str(upside_down))
    assert done.returncode != 0
    assert "BROKEN" in done.stdout


def test_every_module_of_the_package_is_in_a_layer() -> None:
    # exhaustive = true: a new top-level module or subpackage must be placed in the contract.
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert contract["contracts"][0]["exhaustive"] is True
    placed = {name.strip() for layer in contract["contracts"][0]["layers"]
              for name in layer.split(":")}
    package = ROOT / "runflow_worker"
    present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in package.glob("*/__init__.py")}
    assert present == placed
