"""Aggregates of per-case scores, and the paired bootstrap behind no-regression gates.

Every statistic a gate can name (`mean`, `p50`, `p95`, `p99`, `pass_rate`) is computed the same way
here for a gate, for the report table and for the bootstrap, so the numbers in a verdict agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlops.util import percentile

STATS = ("mean", "p50", "p95", "p99", "pass_rate")
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
RESAMPLES = 2000  # enough for a stable 95% bound (its Monte Carlo error is ~0.5% of the spread)
BATCH = 64  # resamples per vectorised step: bounds memory to BATCH x n floats for large suites


def passes(value: float, threshold: float, higher_is_better: bool, failed: bool = False) -> bool:
    """Does one case pass a pass_rate threshold? A failed case never passes."""
    if failed:
        return False
    return value >= threshold if higher_is_better else value <= threshold


def aggregate(
    values: Sequence[float],
    stat: str,
    threshold: float | None = None,
    higher_is_better: bool = True,
    failed: Sequence[bool] | None = None,
) -> float:
    """`stat` over per-case values. Empty input gives 0.0 (callers report n alongside)."""
    if not values:
        return 0.0
    if stat == "mean":
        return math.fsum(values) / len(values)
    if stat == "pass_rate":
        if threshold is None:
            raise ValueError("pass_rate needs a threshold")
        flags = failed if failed is not None else [False] * len(values)
        ok = sum(1 for v, f in zip(values, flags, strict=True) if passes(v, threshold, higher_is_better, f))
        return ok / len(values)
    if stat in QUANTILES:
        return percentile(list(values), QUANTILES[stat])
    raise ValueError(f"unknown stat {stat!r} (valid: {', '.join(STATS)})")


@dataclass(frozen=True)
class Interval:
    """stat(candidate) - stat(production) over the same cases, in the metric's own units."""

    delta: float
    low: float
    high: float
    n: int


def _vectorised(stat: str) -> Callable[[Any, int], Any]:
    import numpy as np

    if stat in ("mean", "pass_rate"):  # pass_rate arrives as 0/1 indicators
        return lambda x, axis: np.mean(x, axis=axis)
    q = QUANTILES[stat] * 100
    return lambda x, axis: np.percentile(x, q, axis=axis)  # linear, like mlops.util.percentile


def paired_bootstrap(
    cand: Sequence[float],
    prod: Sequence[float],
    level: float,
    stat: str = "mean",
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Interval:
    """Two-sided `level` interval of stat(cand) - stat(prod), resampling cases (pairs) together.

    Uses scipy.stats.bootstrap with `paired=True` and the percentile method (BCa warns and can
    give NaN on the 0/1 data most metrics produce). For pass_rate, pass 0/1 indicators.
    """
    import numpy as np
    from scipy import stats

    c = np.asarray(cand, dtype=float)
    p = np.asarray(prod, dtype=float)
    if c.shape != p.shape:
        raise ValueError(f"paired samples differ in length: {c.shape[0]} vs {p.shape[0]}")
    n = int(c.shape[0])
    fn = _vectorised(stat)
    if n == 0:
        return Interval(0.0, 0.0, 0.0, 0)
    delta = float(fn(c, 0) - fn(p, 0))
    if n < 2 or (np.ptp(c) == 0 and np.ptp(p) == 0) or np.array_equal(c, p):
        return Interval(delta, delta, delta, n)  # nothing varies: every resample gives the same delta

    def statistic(x: Any, y: Any, axis: int) -> Any:
        return fn(x, axis) - fn(y, axis)

    res = stats.bootstrap(
        (c, p),
        statistic,
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=resamples,
        batch=BATCH,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = delta
    return Interval(delta, min(low, delta), max(high, delta), n)
