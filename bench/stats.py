"""The benchmarks' summary statistics: medians, percentiles, a paired difference with its
bootstrap interval."""

from __future__ import annotations

import random
import statistics


def paired_difference(ours: list[float], baseline: list[float],
                      resamples: int = 2000) -> dict[str, float]:
    """Median of the per-round differences ``ours - baseline`` with a 95% bootstrap
    interval of that median (the rounds resampled with replacement)."""
    diffs = [a - b for a, b in zip(ours, baseline, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs)))
                     for _ in range(resamples))
    return {"median": round(statistics.median(diffs), 2),
            "ci95_low": round(medians[int(resamples * 0.025)], 2),
            "ci95_high": round(medians[int(resamples * 0.975) - 1], 2)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values_ms), 2),
            "p90_ms": round(pct(values_ms, 0.9), 2),
            "min_ms": round(min(values_ms), 2), "max_ms": round(max(values_ms), 2)}


def phase_medians(phases: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for ph in phases for k in ph})
    return {k: round(statistics.median(ph.get(k, 0) for ph in phases), 2) for k in names}
