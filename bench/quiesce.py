"""Waiting, before a benchmark run, until what the previous run left running has ended.

Interleaved rows share two CPUs with what the row before them leaves behind once its own
measured window has closed: bare ComfyUI's OpenMP threads spin on for a few milliseconds
after its result is back (5-7 ms here, one or both CPUs busy), a daemon tidies the last
run's directories after its terminal event, the in-process pipeline does the same in this
process. Measured by the row before each run (``docs/serve.md``, "Benchmark: each run on
an idle machine"), a run right after bare's was ~2 ms slower than the same row's run after
another row: the benchmark charged bare's spinning threads to whichever row came next.
``--gap-ms`` idled a fixed time instead, long enough for any leftover, and the machine went
cold meanwhile (bare ComfyUI itself 2.7 ms slower after 30 ms of idle).

``Quiesce.wait`` returns once nothing but the waiting thread has been runnable on the
machine for ``window_s``: as soon as the leftovers end, and no later.

Why hand-written, and why this signal: the kernel's count of runnable tasks, the fourth
field of ``/proc/loadavg`` (``running/total``), is current at every read and costs one
small read (~15 µs here). The CPU time of the benchmark's processes was tried first and is
stale: another process's CPU clock, like its ``/proc`` counters, moves for a thread that is
running only at a scheduler tick (4 ms here), so a spinning thread looked idle between two
ticks; per-thread clocks, which are current, are readable only inside their own process.
Linux only, as the benchmark's sandbox is.
"""

from __future__ import annotations

import time

from bench.stats import summary


def runnable_tasks() -> int:
    """Tasks runnable on the machine now, the reading thread included."""
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().split()[3].split(b"/")[0])


class Quiesce:
    """Waits until the machine is idle but for the waiting thread (module docstring)."""

    def __init__(self, *, window_s: float = 0.001, poll_s: float = 0.0002,
                 timeout_s: float = 0.2) -> None:
        self.window_s = window_s
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.waited_s: list[float] = []
        """How long each ``wait`` took."""
        self.timeouts = 0
        """Waits that gave up at ``timeout_s`` (the run went ahead on a busy machine)."""

    def wait(self) -> float:
        """Return once no other task was runnable at any read over the last ``window_s``
        (or after ``timeout_s``, counted in ``timeouts``); the seconds waited."""
        start = time.perf_counter()
        quiet_since: float | None = None
        while True:
            busy = runnable_tasks() > 1
            now = time.perf_counter()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= self.window_s:
                break
            if now - start >= self.timeout_s:
                self.timeouts += 1
                break
            time.sleep(self.poll_s)
        waited = time.perf_counter() - start
        self.waited_s.append(waited)
        return waited

    def summary(self) -> dict[str, float | int]:
        """The waits, for the benchmark's JSON."""
        if not self.waited_s:
            return {"waits": 0}
        waited_ms = [s * 1000 for s in self.waited_s]
        return {"waits": len(waited_ms), **summary(waited_ms), "timeouts": self.timeouts,
                "window_ms": self.window_s * 1000}
