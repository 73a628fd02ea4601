"""The benchmarks' summary statistics: medians, percentiles, a paired difference with its
bootstrap interval, one graph's rows side by side."""

from __future__ import annotations

import random
import statistics
from typing import Any


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


def graph_summary(rows: dict[str, list[float]], phases: dict[str, list[dict[str, float]]],
                  after: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """One graph's rows (``bench_serve.py``): each row's summary and phase medians, its
    median by the row run just before it (``after``), its overhead over ``bare`` and, for a
    row with a ``<row>@baseline``, the paired difference."""
    g: dict[str, Any] = {label: summary(values) for label, values in rows.items()}
    g["phase_medians_ms"] = {label: phase_medians(ph) for label, ph in phases.items()}
    # Equal where no row's leftovers reach the next (``bench/quiesce.py``).
    g["median_ms_by_previous_row"] = {
        label: {prev: round(statistics.median(v), 2) for prev, v in sorted(by.items())}
        for label, by in after.items()}
    if "bare" in rows:
        g["overhead_over_bare_ms"] = {
            label: {"median": round(statistics.median(rows[label])
                                    - statistics.median(rows["bare"]), 2),
                    "p90": round(pct(rows[label], 0.9) - pct(rows["bare"], 0.9), 2)}
            for label in rows if label != "bare"}
    # Each round's run of a row minus its baseline's run in the same round, so the
    # machine's drift between rounds cancels.
    g["paired_vs_baseline_ms"] = {
        label: paired_difference(rows[label], rows[f"{label}@baseline"])
        for label in rows if f"{label}@baseline" in rows}
    return g
