"""How long this process has been up: the boot time a container's first GPU run is billed
as ``cold_start_seconds`` (SPEC §7)."""

from __future__ import annotations

import os
import time

_IMPORTED_MONOTONIC = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``; else since this module loaded)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime_s = float(fh.read().split()[0])
        return max(0.0, uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_MONOTONIC
