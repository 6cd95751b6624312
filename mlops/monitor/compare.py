"""Two-sample tests for live comparisons (candidate against production on the same window).

One-sided throughout: a canary asks "is the candidate worse?", never "is it different?", so the
whole alpha goes to the side that fails it. scipy is imported inside (`validate` never pays for it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TestResult:
    statistic: float  # z for the proportion tests, U (of the first sample) for Mann-Whitney
    p_value: float  # one-sided: the first sample is worse (more errors, larger values)
    effect: float  # the first sample's rate minus the second's; for Mann-Whitney P(X > Y) + P(X = Y)/2


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Pooled two-proportion z-test of H1: p1 > p2 (`x` events out of `n` trials each).

    No evidence either way (a side without trials, or pooled rate 0 or 1) is p = 1: a step that
    saw no errors on either side has nothing to fail on."""
    if n1 <= 0 or n2 <= 0:
        return TestResult(0.0, 1.0, 0.0)
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0.0:
        return TestResult(0.0, 1.0, p1 - p2)
    z = (p1 - p2) / math.sqrt(var)
    return TestResult(z, normal_sf(z), p1 - p2)


def binomial_above(x: int, n: int, p0: float) -> TestResult:
    """Exact one-sided binomial test of H1: the rate behind `x` events in `n` trials is over `p0`
    (p = P(X >= x) for X ~ Binomial(n, p0)): a ceiling judged on the evidence, not on one unlucky
    request out of fifty."""
    if n <= 0:
        return TestResult(0.0, 1.0, 0.0)
    from scipy.stats import binom

    return TestResult(float(x), float(binom.sf(x - 1, n, p0)), x / n - p0)


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> TestResult:
    """Mann-Whitney U test of H1: X is stochastically greater than Y (e.g. the candidate's latencies
    against production's). Exact p for small samples without ties, else the normal approximation
    with tie correction (scipy's `method="auto"`)."""
    if not len(x) or not len(y):
        return TestResult(0.0, 1.0, 0.5)
    from scipy.stats import mannwhitneyu

    res = mannwhitneyu(list(x), list(y), alternative="greater")
    u = float(res.statistic)
    return TestResult(u, float(res.pvalue), u / (len(x) * len(y)))


def above(x: Sequence[float], y: Sequence[float], q: float = 0.95) -> TestResult:
    """A tail test: the share of each sample above the pooled `q` quantile, compared by
    `two_proportion_z` (H1: more of X lies above it). A regression in the slowest 5% moves p95 but
    hardly moves a rank test, which weighs every request the same."""
    pooled = sorted([*x, *y])
    if not pooled:
        return TestResult(0.0, 1.0, 0.0)
    cut = pooled[min(len(pooled) - 1, int(q * len(pooled)))]
    return two_proportion_z(sum(1 for v in x if v > cut), len(x), sum(1 for v in y if v > cut), len(y))
