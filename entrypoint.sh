#!/usr/bin/env bash
# Container entry point. PID 1 is tini, which forwards SIGTERM; it stays root, so that
# custom-node code running as the worker's user cannot read PID 1's environment (where
# every credential of the container is). This script then becomes runflow-worker, as the
# unprivileged user RUNFLOW_USER (default runflow), so signals reach the daemon directly.
# The daemon reads its own process age to bill the container's boot as the first run's
# cold start.
set -euo pipefail
user=${RUNFLOW_USER:-runflow}
if [ "$(id -u)" = 0 ] && id "$user" >/dev/null 2>&1; then
  exec setpriv --reuid="$(id -u "$user")" --regid="$(id -g "$user")" --init-groups -- "$0" "$@"
fi
mkdir -p "${RUNFLOW_CACHE_DIR:-/cache}"
exec runflow-worker "$@"
