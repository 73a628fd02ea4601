"""Operating the worker: OOM promotion, health and metrics, the submit/status CLI, logs."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from pathlib import Path

import pytest

from runflow_worker.logs import JsonFormatter, redact
from runflow_worker.run.gpu import GpuInfo, class_for_gpu, next_larger_class
from runflow_worker.serve import keys
from runflow_worker.settings import parse_ladder
from tests.support import factories
from tests.support.cli import run_cli
from tests.support.queue import events, graph, is_terminal, record, submit
from tests.support.redis_server import free_port
from tests.support.waiting import wait_for

OOM = {"8": {"class_type": "FakeOOM", "inputs": {}}}
LADDER = parse_ladder("cpu:0,t4:16,l4:24,a10g:24,l40s:48,a100-40gb:40,a100-80gb:80,h100:80,"
                      "h200:141")


# --------------------------------------------------------------------------- OOM


@pytest.mark.timeout(60)
def test_oom_is_promoted_up_the_ladder_then_fails_at_the_top(r, inprocess_worker) -> None:
    ladder = "cpu:0,t4:16"
    submit(r, "hungry", graph(extra=OOM))
    w = inprocess_worker(burst=True, gpu_ladder=ladder)
    w.thread.join(30)
    rec = record(r, "hungry")
    assert rec["status"] == "queued" and rec["attempt"] == 2
    assert [a["outcome"] for a in rec["billing"]["attempts"]] == ["out_of_memory"]
    [(_, fields)] = r.xrange(keys.runs_stream("t4"))
    moved = json.loads(fields["run"])
    assert moved["attempt"] == 2 and moved["billing"]["attempts"][0]["gpu_class"] == "cpu"
    queued = [e for e in events(r, "hungry") if e["type"] == "status"]
    assert [e["status"] for e in queued] == ["queued", "running", "queued"]
    assert queued[-1]["data"]["gpu_class"] == "t4"

    top = inprocess_worker(burst=True, gpu_ladder=ladder, gpu_class="t4")
    top.thread.join(30)
    rec = record(r, "hungry")
    assert rec["status"] == "failed" and rec["error"]["code"] == "OUT_OF_MEMORY"
    assert [(a["attempt"], a["gpu_class"]) for a in rec["billing"]["attempts"]] == [
        (1, "cpu"), (2, "t4")]
    assert rec["billing"]["gpu_seconds"] == pytest.approx(
        sum(a["gpu_seconds"] for a in rec["billing"]["attempts"]), abs=0.002)


@pytest.mark.timeout(60)
def test_next_attempt_after_promotion_carries_the_billed_sum(r, inprocess_worker) -> None:
    # FakeSleep before FakeOOM: attempt 2 is visibly running before it fails too.
    submit(r, "sum", graph(sleep_s=1.5, extra=OOM))
    w = inprocess_worker(burst=True, gpu_ladder="cpu:0,t4:16")
    w.thread.join(30)
    [(_, fields)] = r.xrange(keys.runs_stream("t4"))
    carried = json.loads(fields["run"])["billing"]
    first = carried["attempts"][0]["gpu_seconds"]
    assert first > 0 and carried["gpu_seconds"] == first
    assert record(r, "sum")["billing"]["gpu_seconds"] == first  # the queued record

    def running_record() -> dict | None:
        rec = record(r, "sum")
        return rec if rec["status"] == "running" else None

    inprocess_worker(gpu_ladder="cpu:0,t4:16", gpu_class="t4")
    running = wait_for(running_record, 20, "attempt 2 to run")
    assert running["attempt"] == 2
    assert running["billing"]["gpu_seconds"] == first
    assert [a["attempt"] for a in running["billing"]["attempts"]] == [1]


@pytest.mark.timeout(60)
def test_explicit_mode_promotes_only_to_listed_classes(r, inprocess_worker) -> None:
    wf = factories.workflow(graph(extra=OOM), gpu_mode="explicit",
                            gpu_explicit_models=["a10g"])
    submit(r, "picky", wf=wf)
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    assert r.xlen(keys.runs_stream("a10g")) == 1
    assert r.xlen(keys.runs_stream("t4")) == 0


def test_ladder_helpers() -> None:
    assert next_larger_class("cpu", LADDER) == "t4"
    assert next_larger_class("h200", LADDER) is None
    assert next_larger_class("t4", LADDER, explicit=["h100", "cpu"]) == "h100"
    assert next_larger_class("h100", LADDER, explicit=["t4"]) is None
    gib = 2**30
    cases = {
        ("NVIDIA L4", 23): "l4", ("NVIDIA L40S", 45): "l40s", ("Tesla T4", 15): "t4",
        ("NVIDIA A10G", 23): "a10g", ("NVIDIA A100-SXM4-80GB", 80): "a100-80gb",
        ("NVIDIA A100-PCIE-40GB", 40): "a100-40gb", ("NVIDIA A100 80GB PCIe", 80): "a100-80gb",
        ("NVIDIA H100 80GB HBM3", 80): "h100", ("NVIDIA H200", 141): "h200",
        ("NVIDIA GeForce RTX 4090", 24): "l4",
    }
    for (name, vram), expected in cases.items():
        assert class_for_gpu(GpuInfo(name, vram * gib), LADDER) == expected, name
    assert class_for_gpu(GpuInfo("Tiny GPU", 2 * gib), LADDER) is None


@pytest.mark.timeout(60)
def test_child_crash_fails_that_run_only(r, inprocess_worker) -> None:
    submit(r, "crasher", graph(extra={"8": {"class_type": "FakeCrash", "inputs": {}}}))
    submit(r, "after-crash")
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    rec = record(r, "crasher")
    assert rec["status"] == "failed" and rec["error"]["code"] == "INTERNAL"
    assert "died" in rec["error"]["message"]
    assert record(r, "after-crash")["status"] == "succeeded"
    text = w.worker.metrics.render().decode()
    assert "runflow_runner_restarts_total 1.0" in text


# --------------------------------------------------------------------------- health


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(60)
def test_health_readiness_and_metrics(r, inprocess_worker) -> None:
    port = free_port()
    submit(r, "measured")
    submit(r, "refused", input={"nope": 1})
    w = inprocess_worker(http_port=port)
    wait_for(lambda: is_terminal(r, "measured") and is_terminal(r, "refused"), 20, "runs")
    base = f"http://127.0.0.1:{port}"
    assert _get(base + "/healthz")[0] == 200
    assert _get(base + "/readyz")[0] == 200
    status, text = _get(base + "/metrics")
    assert status == 200
    assert 'runflow_runs_total{error_code="",status="succeeded"} 1.0' in text
    assert 'runflow_runs_total{error_code="INVALID_INPUT",status="failed"} 1.0' in text
    assert 'runflow_run_phase_seconds_count{phase="execute"} 1.0' in text
    assert "runflow_queue_wait_seconds_count 2.0" in text
    assert 'runflow_gpu_seconds_total{gpu_class="cpu"}' in text
    for name in ("runflow_cache_hits_total", "runflow_cache_misses_total",
                 "runflow_cache_bytes", "runflow_runner_restarts_total",
                 "runflow_oom_promotions_total"):
        assert name in text
    assert _get(base + "/nope")[0] == 404
    w.worker.shutdown.request_warm(5)
    assert _get(base + "/readyz")[0] == 503


# --------------------------------------------------------------------------- CLI


def _deployed(tmp_path: Path, **wf_overrides) -> Path:
    path = tmp_path / "deployed.json"
    path.write_text(json.dumps(factories.workflow(graph(), **wf_overrides)))
    return path


@pytest.mark.timeout(60)
def test_submit_prints_the_run_id_and_status_prints_the_record(
        r, redis_server, tmp_path: Path, monkeypatch, capsys) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"prompt": "from a file"}))
    code, out, _ = run_cli(["submit", str(_deployed(tmp_path)), "--inputs-json", str(inputs),
                         "--run-id", "cli-1", "--timeout-s", "60"], redis_server.url,
                        monkeypatch, capsys)
    assert code == 0 and out.strip() == "cli-1"
    rec = record(r, "cli-1")
    assert rec["status"] == "queued"
    [(_, fields)] = r.xrange(keys.runs_stream("cpu"))
    message = json.loads(fields["run"])
    assert message["run_id"] == "cli-1" and message["input"] == {"prompt": "from a file"}
    assert message["timeout_s"] == 60
    code, out, _ = run_cli(["status", "cli-1"], redis_server.url, monkeypatch, capsys)
    assert code == 0 and json.loads(out)["status"] == "queued"
    code, _, err = run_cli(["status", "missing"], redis_server.url, monkeypatch, capsys)
    assert code == 1 and "no record" in err


@pytest.mark.timeout(60)
def test_submit_keeps_the_message_run_id_and_rejects_bad_inputs(
        r, redis_server, tmp_path: Path, monkeypatch, capsys) -> None:
    whole = tmp_path / "message.json"
    whole.write_text(json.dumps(factories.message(graph(), run_id="from-message")))
    code, out, _ = run_cli(["submit", str(whole)], redis_server.url, monkeypatch, capsys)
    assert code == 0 and out.strip() == "from-message"
    code, out, err = run_cli(["submit", str(_deployed(tmp_path)), "--input", "nope=1"],
                          redis_server.url, monkeypatch, capsys)
    assert code == 2 and "INVALID_INPUT" in err
    assert r.xlen(keys.runs_stream("cpu")) == 1


@pytest.mark.timeout(60)
def test_submit_wait_follows_the_run_and_exits_by_status(
        r, redis_server, inprocess_worker, tmp_path: Path, monkeypatch, capsys) -> None:
    inprocess_worker()
    code, out, err = run_cli(["submit", str(_deployed(tmp_path)), "--input", "prompt=hi",
                           "--wait", "--run-id", "waited"], redis_server.url, monkeypatch,
                          capsys)
    assert code == 0
    assert json.loads(out)["status"] == "succeeded"
    assert "status: running" in err and "status: succeeded" in err
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(factories.workflow(graph(extra={
        "8": {"class_type": "FakeError", "inputs": {}}}))))
    code, out, _ = run_cli(["submit", str(failing), "--input", "prompt=x", "--wait"],
                        redis_server.url, monkeypatch, capsys)
    assert code == 1 and json.loads(out)["error"]["code"] == "NODE_ERROR"


# --------------------------------------------------------------------------- logs


def test_json_log_lines_carry_fields_and_never_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.serve.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upload to https://bucket.s3/x.png?X-Amz-Signature=abc failed, "
                       "secret whsec_c2VjcmV0 and https://user:pw@host/p",
                       extra={"run_id": "r1", "url": "https://h/p?sig=1"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["run_id"] == "r1" and line["level"] == "warning"
    text = json.dumps(line)
    for secret in ("X-Amz-Signature", "whsec_c2VjcmV0", "user:pw", "sig=1"):
        assert secret not in text
    assert redact("plain text") == "plain text"
