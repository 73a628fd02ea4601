#!/usr/bin/env bash
# Container entry point. PID 1 is tini, which forwards SIGTERM; it stays root, so that
# custom-node code running as the worker's user cannot read PID 1's environment (where
# every credential of the container is). This script then becomes runflow-worker, as the
# unprivileged user RUNFLOW_USER (default runflow), so signals reach the daemon directly.
# The daemon reads its own process age to bill the container's boot as the first run's
# cold start.
set -euo pipefail
user=${RUNFLOW_USER:-runflow}
cache=${RUNFLOW_CACHE_DIR:-/cache}
if [ "$(id -u)" = 0 ] && id "$user" >/dev/null 2>&1; then
  uid=$(id -u "$user")
  gid=$(id -g "$user")
  # A host directory mounted as the cache (one per node) arrives owned by root: hand it
  # (not what is in it) to the worker. Any other owner was chosen by the operator: kept.
  if [ -d "$cache" ] && [ "$(stat -c %u "$cache")" = 0 ]; then
    chown "$uid:$gid" "$cache" || echo "entrypoint: cannot hand $cache to $user" >&2
  fi
  exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$0" "$@"
fi
mkdir -p "$cache"
exec runflow-worker "$@"
