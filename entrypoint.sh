#!/usr/bin/env bash
# Container entry point: records the boot time (billed as the first run's cold start) and
# hands PID 1's signals to runflow-worker (tini forwards SIGTERM for the graceful drain).
set -euo pipefail
export RUNFLOW_BOOT_EPOCH_S=${RUNFLOW_BOOT_EPOCH_S:-$(date +%s.%N)}
mkdir -p "${RUNFLOW_CACHE_DIR:-/cache}"
exec runflow-worker "$@"
