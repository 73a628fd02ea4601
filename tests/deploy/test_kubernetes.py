"""``deploy/kubernetes``: every overlay renders, validates against the Kubernetes schemas and
KEDA's CRDs, and says what the worker needs (scale to zero on the class's stream, the grace
period, the probes, credentials from Secrets, the sandbox's settings)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.serve import keys
from runflow_worker.settings import Settings
from tests.deploy.conftest import (
    ALL_OVERLAYS,
    CLASS_OVERLAYS,
    KUBERNETES_VERSION,
    by_kind,
    crd_schema,
    documents,
    render,
    run_tool,
    tool,
    yaml,
)

pytestmark = pytest.mark.timeout(180)

UPLOAD_ALLOWANCE_S = 60
"""What the pod must be given after RUNFLOW_GRACE_S: the upload of a run that finished just
in time (or the release of one that did not), the terminal write and the callbacks' last
try."""
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml",
             "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}
CREDENTIAL = re.compile(r"(REDIS_URL|SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)")
SANDBOX_SETTINGS = {"sandbox", "child_network"}
"""Settings of the ComfyUI child's sandbox (RUNFLOW_SANDBOX, RUNFLOW_CHILD_NETWORK)."""


@pytest.fixture(scope="module", params=ALL_OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(overlay, its rendered YAML)."""
    return request.param, render(request.param)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind(docs, kind)
    return doc


def _worker(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_validates_against_the_kubernetes_schemas(rendered: tuple[str, str],
                                                  tmp_path: Path) -> None:
    overlay, text = rendered
    validate = tool("kubernetes-validate")
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text)
    out = run_tool(validate, "--strict", "-k", KUBERNETES_VERSION, str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    # Every object of a Kubernetes kind was checked (only KEDA's kinds have no schema there).
    native = [d for d in documents(text) if d["kind"] not in KEDA_CRDS]
    assert out.stdout.count("passed for resource") == len(native), out.stdout


def test_keda_objects_validate_against_kedas_crds(rendered: tuple[str, str],
                                                  tmp_path: Path) -> None:
    overlay, text = rendered
    check = tool("check-jsonschema")
    docs = documents(text)
    for kind, crd in KEDA_CRDS.items():
        objects = by_kind(docs, kind)
        assert objects, f"no {kind} in {overlay}"
        schema = crd_schema(crd, tmp_path)
        for n, obj in enumerate(objects):
            path = tmp_path / f"{kind}-{n}.yaml"
            path.write_text(yaml.safe_dump(obj))
            out = run_tool(check, "--schemafile", str(schema), str(path))
            assert out.returncode == 0, out.stdout + out.stderr


def test_the_checks_catch_a_misspelt_field(tmp_path: Path) -> None:
    """Neither check passes everything: an unknown field fails each of them."""
    docs = documents(render("l4"))
    scaled = _one(docs, "ScaledObject")
    scaled["spec"]["minReplicaCont"] = 0
    path = tmp_path / "bad-scaledobject.yaml"
    path.write_text(yaml.safe_dump(scaled))
    out = run_tool(tool("check-jsonschema"), "--schemafile",
                   str(crd_schema(KEDA_CRDS["ScaledObject"], tmp_path)), str(path))
    assert out.returncode != 0
    deployment = _one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    path = tmp_path / "bad-deployment.yaml"
    path.write_text(yaml.safe_dump(deployment))
    out = run_tool(tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
                   str(path))
    assert out.returncode != 0


@pytest.mark.parametrize("gpu_class", CLASS_OVERLAYS)
def test_scales_to_zero_on_the_classs_stream(gpu_class: str) -> None:
    docs = documents(render(gpu_class))
    deployment, scaled = _one(docs, "Deployment"), _one(docs, "ScaledObject")
    assert gpu_class in [r.name for r in Settings().ladder]
    assert _env(_worker(deployment))["RUNFLOW_GPU_CLASS"]["value"] == gpu_class
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert spec.get("idleReplicaCount", 0) == 0
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    auths = {a["metadata"]["name"] for a in by_kind(docs, "TriggerAuthentication")}
    triggers = spec["triggers"]
    assert len(triggers) == 2
    measured = set()
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == keys.runs_stream(gpu_class) == f"runflow:runs:{gpu_class}"
        assert meta["consumerGroup"] == keys.CONSUMER_GROUP == "workers"
        # One run per pod: one pod per waiting (lag) or in-flight (pending) entry.
        (metric,) = {"lagCount", "pendingEntriesCount"} & set(meta)
        assert meta[metric] == "1"
        measured.add(metric)
        assert trigger["authenticationRef"]["name"] in auths
    assert measured == {"lagCount", "pendingEntriesCount"}


@pytest.mark.parametrize("gpu_class", CLASS_OVERLAYS)
def test_grace_probes_and_idle_window_match_the_settings(gpu_class: str) -> None:
    docs = documents(render(gpu_class))
    deployment, scaled = _one(docs, "Deployment"), _one(docs, "ScaledObject")
    pod = deployment["spec"]["template"]["spec"]
    worker = _worker(deployment)
    env = _env(worker)
    settings = Settings(**{name.removeprefix("RUNFLOW_").lower(): e["value"]
                           for name, e in env.items()
                           if name.startswith("RUNFLOW_") and "value" in e
                           and name.removeprefix("RUNFLOW_").lower() in Settings.model_fields})
    # SIGTERM: the current run gets RUNFLOW_GRACE_S, then its upload or release must fit.
    assert pod["terminationGracePeriodSeconds"] >= settings.grace_s + UPLOAD_ALLOWANCE_S
    # Probes on the worker's health port.
    ports = {p.get("name"): p["containerPort"] for p in worker["ports"]}
    assert settings.http_port in ports.values()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = worker[probe]["httpGet"]
        assert get["path"] == path
        port = ports.get(get["port"], get["port"])
        assert port == settings.http_port, probe
    # Scale to zero is KEDA's (cooldownPeriod after the last run): a worker that also exited
    # by itself when idle would be restarted by the kubelet, so its idle exit is off, or
    # comes only after KEDA would have stopped it.
    cooldown = scaled["spec"]["cooldownPeriod"]
    polling = scaled["spec"].get("pollingInterval", 30)
    assert settings.idle_exit_s == 0 or settings.idle_exit_s > cooldown + polling
    assert cooldown > 0


@pytest.mark.parametrize("gpu_class", CLASS_OVERLAYS)
def test_gpu_nodes_credentials_and_sandbox(gpu_class: str) -> None:
    docs = documents(render(gpu_class))
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    worker = _worker(deployment)
    env = _env(worker)
    # Every RUNFLOW_* variable set is a setting of the worker.
    known = set(Settings.model_fields) | SANDBOX_SETTINGS
    assert {n.removeprefix("RUNFLOW_").lower() for n in env if n.startswith("RUNFLOW_")} <= known
    # One GPU, on a node of the class.
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["RUNFLOW_DEVICE"]["value"] == "cuda"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert any(expr["key"] == "nvidia.com/gpu.product" and expr["values"]
               for term in terms for expr in term["matchExpressions"])
    # Credentials only from Secrets, never inline; the ConfigMaps hold none.
    for name, entry in env.items():
        if CREDENTIAL.search(name):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name
    for config in by_kind(docs, "ConfigMap"):
        assert not any(CREDENTIAL.search(k) for k in config.get("data", {}))
    for auth in by_kind(docs, "TriggerAuthentication"):
        assert auth["spec"]["secretTargetRef"] and set(auth["spec"]) == {"secretTargetRef"}
    # The sandbox: user namespaces allowed, nothing privileged.
    assert pod["securityContext"]["seccompProfile"]["type"] == "Unconfined"
    assert pod["securityContext"]["appArmorProfile"]["type"] == "Unconfined"
    context = worker["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert "SYS_ADMIN" not in context["capabilities"].get("add", [])
    assert env["RUNFLOW_SANDBOX"]["value"] == "bwrap"
    assert env["RUNFLOW_CHILD_NETWORK"]["value"] == "none"
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert mounts["cache"] == env["RUNFLOW_CACHE_DIR"]["value"]


def test_cache_volume_per_node_or_shared() -> None:
    def cache_volume(overlay: str) -> dict[str, Any]:
        deployment = _one(documents(render(overlay)), "Deployment")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        return volumes["cache"]

    per_node = cache_volume("l4")
    assert set(per_node) == {"name", "hostPath"}
    shared = cache_volume("l4-shared-cache")
    assert set(shared) == {"name", "persistentVolumeClaim"}
    docs = documents(render("l4-shared-cache"))
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == shared["persistentVolumeClaim"]["claimName"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
