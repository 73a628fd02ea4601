#!/usr/bin/env bash
# Checks a GPU worker where it runs; builds nothing. Four checks, each printed PASS, FAIL or
# SKIP with what it found; the exit status is 1 when any failed.
#
#   cuda   torch sees a CUDA device, initialises it and runs a kernel on it
#   nvml   NVML (nvidia-ml-py) names the GPU, the ladder maps it to a class, and `serve`
#          would accept that class (RUNFLOW_DEVICE resolves to cuda)
#   xformers  xformers imports and its memory-efficient attention on the GPU matches
#          PyTorch's own attention
#   oom    a real CUDA out-of-memory error: ComfyUI (the checkout) runs a graph whose node
#          asks for twice the GPU's memory; the run must fail OUT_OF_MEMORY, the worker
#          must promote it to the next larger class with attempt 2 and this attempt's GPU
#          time billed, and the same ComfyUI process must run the next graph.
#
# Usage:
#   scripts/gpu-check.sh                       # in this environment (the image, a venv)
#   scripts/gpu-check.sh --container NAME      # in a running container (docker exec)
#   options: --comfyui DIR (default $RUNFLOW_COMFYUI_DIR, else /opt/ComfyUI),
#            --no-xformers (an image built without xformers: the check is skipped)
set -euo pipefail

container=""
comfyui="${RUNFLOW_COMFYUI_DIR:-/opt/ComfyUI}"
xformers=required
args=("$@")
while [ "$#" -gt 0 ]; do
  case "$1" in
    --container) container=${2:?--container needs a name}; shift 2 ;;
    --comfyui) comfyui=${2:?--comfyui needs a directory}; shift 2 ;;
    --no-xformers) xformers=skip; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -n "$container" ]; then
  # The same script, inside the container, without the --container option.
  rest=()
  skip=0
  for a in "${args[@]}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    if [ "$a" = --container ]; then skip=1; continue; fi
    rest+=("$a")
  done
  exec docker exec -i "$container" bash -s -- "${rest[@]}" < "$0"
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || python=python
GPU_CHECK_COMFYUI="$comfyui" GPU_CHECK_XFORMERS="$xformers" exec "$python" - <<'PY'
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

results = []


def check(name):
    def wrap(fn):
        try:
            verdict, text = fn()
        except Exception as exc:  # every check reports, none stops the others
            verdict, text = "FAIL", f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        results.append(verdict)
        print(f"{verdict:4} {name}: {text}", flush=True)
        return fn
    return wrap


@check("cuda")
def _cuda():
    import torch

    if not torch.cuda.is_available():
        return "FAIL", f"torch {torch.__version__} sees no CUDA device"
    torch.cuda.init()
    a = torch.randn(1024, 1024, device="cuda")
    total = float((a @ a).sum())  # a kernel ran and its result came back
    props = torch.cuda.get_device_properties(0)
    return "PASS", (f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                    f"{props.name}, {props.total_memory / 2**30:.0f} GiB, matmul ok "
                    f"({total:.1f})")


@check("nvml")
def _nvml():
    from runflow_worker.run.gpu import class_for_gpu, detect_gpu, resolve_device
    from runflow_worker.settings import Settings

    settings = Settings()
    info = detect_gpu()
    if info is None:
        return "FAIL", "NVML finds no GPU (nvidia-ml-py missing, or no driver)"
    gpu_class = class_for_gpu(info, settings.ladder)
    if gpu_class is None:
        return "FAIL", f"{info.name} ({info.vram_gib:.0f} GiB) matches no ladder class"
    device = resolve_device(settings, gpu_class)
    return "PASS", f"{info.name}, {info.vram_gib:.0f} GiB: class {gpu_class}, device {device}"


@check("xformers")
def _xformers():
    if os.environ["GPU_CHECK_XFORMERS"] == "skip":
        return "SKIP", "--no-xformers"
    import torch
    import xformers
    import xformers.ops as xops

    q, k, v = (torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.float16)
               for _ in range(3))
    got = xops.memory_efficient_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    err = float((got - want).abs().max())
    if err > 1e-2:
        return "FAIL", f"xformers {xformers.__version__}: differs from torch by {err:.3g}"
    return "PASS", f"xformers {xformers.__version__}, attention matches torch ({err:.1e})"


COMFYUI_ORIGIN = "https://github.com/comfyanonymous/ComfyUI"
NODE_PACK = '''
import torch


class GpuCheckAllocate:
    """Allocates `gib` GiB on the GPU and releases it (an output node: always runs)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gib": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1e6})}}

    RETURN_TYPES = ()
    FUNCTION = "allocate"
    OUTPUT_NODE = True
    CATEGORY = "runflow/gpu-check"

    def allocate(self, gib):
        block = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
        del block
        return {}


NODE_CLASS_MAPPINGS = {"GpuCheckAllocate": GpuCheckAllocate}
'''


@check("oom")
def _oom():
    import torch

    from runflow_worker.run.contract import RunStatus, parse_message, utcnow
    from runflow_worker.errors import ErrorCode
    from runflow_worker.run.gpu import class_for_gpu, detect_gpu, next_larger_class
    from runflow_worker.serve.keys import runs_stream
    from runflow_worker.run.pipeline import Pipeline, PipelineConfig
    from runflow_worker.run.record import promoted_run, terminal_record
    from runflow_worker.serve.recordstore import Promotion
    from runflow_worker.settings import Settings
    from runflow_worker.run.storage import LocalStorage

    checkout = Path(os.environ["GPU_CHECK_COMFYUI"])
    if not (checkout / "comfy").is_dir():
        return "FAIL", f"no ComfyUI checkout at {checkout} (--comfyui DIR)"
    settings = Settings()
    info = detect_gpu()
    gpu_class = (class_for_gpu(info, settings.ladder) if info else None) or "l4"
    too_much_gib = 2 * torch.cuda.get_device_properties(0).total_memory / 2**30
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    commit = head if len(head) == 40 else "0" * 40  # another commit is only a warning

    class Control:
        def stop_reason(self):
            return None

        def emit(self, kind, data):
            pass

    def message(run_id, gib):
        return parse_message({
            "run_id": run_id, "attempt": 1, "created_at": "2026-01-01T00:00:00Z",
            "workflow": {
                "id": "gpu-check", "owner": "operator", "slug": "gpu-check", "version": "1",
                "workflow_json": {"1": {"class_type": "GpuCheckAllocate",
                                        "inputs": {"gib": gib}}},
                "custom_nodes": {},
                "environment": {"comfyui": {"origin": COMFYUI_ORIGIN, "commit": commit},
                                "packages": []},
                "models": {}, "resources": {}, "gpu_mode": "auto",
                "gpu_explicit_models": []},
            "input": {}})

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        pack = root / "nodes" / "runflow_gpu_check"
        pack.mkdir(parents=True)
        (pack / "__init__.py").write_text(NODE_PACK)
        pipeline = Pipeline(
            PipelineConfig(work_dir=root / "work", comfyui_dir=checkout, cpu=False,
                           extra_custom_node_dirs=(root / "nodes",)),
            storage=LocalStorage(root / "outputs"))
        try:
            oom = message("gpu-check-oom", too_much_gib)
            started, start = utcnow(), time.monotonic()
            result = pipeline.execute(oom, Control())
            if result.failure is None or result.failure.code is not ErrorCode.OUT_OF_MEMORY:
                got = result.failure.as_error() if result.failure else result.status
                return "FAIL", f"asking for {too_much_gib:.0f} GiB gave {got}"
            record = terminal_record(oom, result, started_at=started, gpu_class=gpu_class,
                                     gpu_seconds=time.monotonic() - start)
            target = next_larger_class(gpu_class, settings.ladder)
            if target is None:
                promoted = "none (the top of the ladder: the run fails OUT_OF_MEMORY)"
            else:
                following, queued = promoted_run(oom, record)
                promotion = Promotion.of(runs_stream(target), following)
                nxt = parse_message(json.loads(promotion.message_json))
                billed = [(a.attempt, a.gpu_class, a.outcome) for a in nxt.billing.attempts]
                if (promotion.stream != runs_stream(target) or nxt.attempt != 2
                        or queued.status is not RunStatus.QUEUED
                        or billed != [(1, gpu_class, "out_of_memory")]):
                    return "FAIL", f"promotion wrong: {promotion.stream}, {nxt.attempt}, {billed}"
                promoted = f"{promotion.stream} as attempt 2, {billed[0]} billed"
            after = pipeline.execute(message("gpu-check-after", 0.25), Control())
            if after.status is not RunStatus.SUCCEEDED:
                return "FAIL", f"the next run after the OOM: {after.failure}"
            return "PASS", (f"{too_much_gib:.0f} GiB on {gpu_class}: OUT_OF_MEMORY, promoted "
                            f"to {promoted}; the next run succeeded in the same process")
        finally:
            pipeline.close()


sys.exit(1 if "FAIL" in results else 0)
PY
