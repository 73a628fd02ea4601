#!/usr/bin/env bash
# Container entry point (PID 1 is tini, which forwards SIGTERM): make sure the cache volume
# exists, then become runflow-worker so signals reach the daemon directly. The daemon reads
# its own process age to bill the container's boot as the first run's cold start.
set -euo pipefail
mkdir -p "${RUNFLOW_CACHE_DIR:-/cache}"
exec runflow-worker "$@"
