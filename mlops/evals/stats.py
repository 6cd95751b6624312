"""Aggregates of per-case scores, and the paired bootstrap behind no-regression gates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlops.serving.stats import percentile


def aggregate(values: list[float], stat: str, threshold: float | None = None) -> float:
    if not values:
        return 0.0
    if stat == "mean":
        return sum(values) / len(values)
    if stat == "pass_rate":
        assert threshold is not None
        return sum(1 for v in values if v >= threshold) / len(values)
    q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[stat]
    return percentile(values, q)


@dataclass(frozen=True)
class Interval:
    delta: float  # candidate - production, in the metric's "better" direction
    low: float
    high: float
    n: int


def paired_bootstrap(cand: list[float], prod: list[float], confidence: float, seed: int = 0, resamples: int = 4000) -> Interval:
    """Two-sided CI of mean(cand - prod) over the same cases (scipy's bootstrap, BCa when it can)."""
    import numpy as np
    from scipy import stats

    diffs = np.asarray(cand, dtype=float) - np.asarray(prod, dtype=float)
    n = len(diffs)
    mean = float(diffs.mean()) if n else 0.0
    if n < 2 or float(diffs.std()) == 0.0:  # degenerate: every case moved by the same amount
        return Interval(mean, mean, mean, n)
    res = stats.bootstrap(
        (diffs,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = mean
    return Interval(mean, low, high, n)
