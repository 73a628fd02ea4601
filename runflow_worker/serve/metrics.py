"""Prometheus metrics of the serve daemon (names fixed by SPEC §8).

Each ``Metrics`` owns its registry, so several workers in one test process do not collide;
the daemon serves it at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_PHASE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800)
_QUEUE_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The worker's counters, gauges and histograms."""

    content_type = CONTENT_TYPE_LATEST
    """Content-Type of ``render()``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs = Counter("runflow_runs", "Runs finalised by this worker.",
                            ["status", "error_code"], registry=r)
        self.phase_seconds = Histogram("runflow_run_phase_seconds",
                                       "Time spent in each phase of a run.", ["phase"],
                                       buckets=_PHASE_BUCKETS_S, registry=r)
        self.queue_wait_seconds = Histogram("runflow_queue_wait_seconds",
                                            "Time from enqueue to pickup.",
                                            buckets=_QUEUE_BUCKETS_S, registry=r)
        self.cache_hits = Counter("runflow_cache_hits", "Model/resource store hits.",
                                  registry=r)
        self.cache_misses = Counter("runflow_cache_misses", "Model/resource store misses.",
                                    registry=r)
        self.cache_bytes = Gauge("runflow_cache_bytes", "Bytes held by the blob store.",
                                 registry=r)
        self.gpu_seconds = Counter("runflow_gpu_seconds", "GPU seconds billed.", ["gpu_class"],
                                   registry=r)
        self.runner_restarts = Counter("runflow_runner_restarts",
                                       "Restarts of the ComfyUI child.", registry=r)
        self.oom_promotions = Counter("runflow_oom_promotions",
                                      "Runs re-enqueued on a larger GPU class after OOM.",
                                      registry=r)
        # Additions beyond SPEC §8 (same prefix).
        self.reclaims = Counter("runflow_reclaims", "Expired entries this worker reclaimed.",
                                registry=r)
        self.dead_letters = Counter("runflow_dead_letters",
                                    "Entries moved to the dead-letter stream.", registry=r)
        self.fenced_writes = Counter("runflow_fenced_writes",
                                     "Writes refused because a newer attempt holds the run.",
                                     registry=r)
        self.redis_errors = Counter("runflow_redis_errors", "Failed Redis operations.",
                                    registry=r)
        self.callbacks = Counter("runflow_callbacks", "Callback deliveries by outcome.",
                                 ["outcome"], registry=r)
        self.unfit_starts = Counter("runflow_unfit_starts",
                                    "ComfyUI starts that failed through the worker's own "
                                    "fault (the run was released).", registry=r)
        self.busy = Gauge("runflow_worker_busy", "1 while a run is in progress.", registry=r)
        self._totals_seen = (0, 0, 0)

    def observe_cache(self, *, hits: int = 0, misses: int = 0, total_bytes: int | None = None,
                      ) -> None:
        """Record blob-store activity (called by whoever owns the store)."""
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)
        if total_bytes is not None:
            self.cache_bytes.set(total_bytes)

    def observe_totals(self, *, runner_restarts: int, cache_hits: int, cache_misses: int,
                       ) -> None:
        """Record the pipeline's running totals (its child's restarts, the blob store's hits
        and misses): what grew since the last call is added to the counters."""
        seen = self._totals_seen
        self.runner_restarts.inc(max(0, runner_restarts - seen[0]))
        self.observe_cache(hits=max(0, cache_hits - seen[1]),
                           misses=max(0, cache_misses - seen[2]))
        self._totals_seen = (max(runner_restarts, seen[0]), max(cache_hits, seen[1]),
                             max(cache_misses, seen[2]))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
