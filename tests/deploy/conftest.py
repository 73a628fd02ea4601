"""Helpers of the deployment checks: the tools (each test skips, with the reason, when its
tool is missing; ``.ci/run`` installs them all), rendering the kustomize overlays, and the
strict JSON schema of a vendored CRD.

Everything here works offline: the Kubernetes schemas ship inside ``kubernetes-validate``,
the KEDA CRDs and the Compose Specification's schema are vendored under ``deploy/schemas``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads the manifests")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
CLASS_OVERLAYS = ("l4", "a100-80gb", "h100")
"""The overlays of one GPU class each (the overlay's directory is the class)."""
ALL_OVERLAYS = (*CLASS_OVERLAYS, "l4-shared-cache")
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests are for (``appArmorProfile`` is a field from 1.30)."""


def tool(name: str) -> str:
    """The path of the command ``name``: beside this Python (its virtual environment's
    ``bin``) or on the PATH. Without it the test is skipped, except in CI (``CI=true``),
    where ``.ci/run`` must have installed it: there it fails."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        why = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return found


def run_tool(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool; the result (never raises on a non-zero exit)."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s,
                          check=False, cwd=REPO)


def render(overlay: str) -> str:
    """``kubectl kustomize`` of ``deploy/kubernetes/overlays/<overlay>`` (the YAML text)."""
    kubectl = tool("kubectl")
    out = run_tool(kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay))
    assert out.returncode == 0, out.stderr
    return out.stdout


def documents(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML text."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of ``kind``."""
    return [d for d in docs if d.get("kind") == kind]


def _strict(node: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as a JSON Schema refusing unknown fields: the API
    server prunes them silently, so a misspelt field would otherwise pass and be lost."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def crd_schema(crd_file: str, tmp_path: Path) -> Path:
    """A JSON Schema file for the objects of the vendored CRD ``crd_file`` (strict)."""
    crd = yaml.safe_load((SCHEMAS / crd_file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind",
                                 "metadata", "spec"})
    path = tmp_path / f"{kind}.schema.json"
    path.write_text(json.dumps(schema))
    return path
