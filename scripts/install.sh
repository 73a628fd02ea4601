#!/usr/bin/env bash
# Installs runflow-worker and a ComfyUI checkout to run it with, into the active Python
# environment (make and activate a virtualenv first).
#
#   scripts/install.sh                 # ComfyUI into ./.comfyui at the pinned commit
#   RUNFLOW_COMFYUI_DIR=/opt/ComfyUI scripts/install.sh   # use an existing checkout
#
# TORCH_SPEC (default torch==2.13.0) and TORCH_INDEX_URL (e.g. the CPU or a CUDA wheel
# index) choose the torch build. torch is installed first and pinned everywhere after, so
# nothing can replace it with an unpinned build.
set -euo pipefail
cd "$(dirname "$0")/.."

COMFYUI_ORIGIN=${COMFYUI_ORIGIN:-https://github.com/comfyanonymous/ComfyUI}
COMFYUI_COMMIT=${COMFYUI_COMMIT:-a125cd84b054a57729b5eecab930ca9408719832}
COMFYUI_DIR=${RUNFLOW_COMFYUI_DIR:-.comfyui}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
index_args=()
extra_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  index_args=(--index-url "$TORCH_INDEX_URL")
  extra_args=(--extra-index-url "$TORCH_INDEX_URL")  # torchvision/torchaudio of that build
fi

python -m pip install "${index_args[@]}" "$TORCH_SPEC"
python -m pip install -e ".[test]"

if [ ! -d "$COMFYUI_DIR/comfy" ]; then
  git clone --filter=blob:none "$COMFYUI_ORIGIN" "$COMFYUI_DIR"
  git -C "$COMFYUI_DIR" checkout --detach "$COMFYUI_COMMIT"
fi

# ComfyUI's requirements, with torch and friends pinned to what is installed. The
# frontend/template packages and the database stack are only used by ComfyUI's own HTTP
# server, which runflow-worker never starts.
constraints=$(mktemp)
python - "$constraints" <<'PY'
import importlib.metadata as md, sys
with open(sys.argv[1], "w") as fh:
    for name in ("torch", "torchvision", "torchaudio"):
        try:
            fh.write(f"{name}=={md.version(name)}\n")
        except md.PackageNotFoundError:
            pass
PY
reqs=$(mktemp)
grep -vE '^(comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs|alembic|SQLAlchemy)' \
  "$COMFYUI_DIR/requirements.txt" > "$reqs"
python -m pip install -c "$constraints" "${extra_args[@]}" -r "$reqs" requests
rm -f "$constraints" "$reqs"
echo "ComfyUI ready in $COMFYUI_DIR (export RUNFLOW_COMFYUI_DIR=$COMFYUI_DIR)"
