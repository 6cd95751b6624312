"""Drift statistics on numpy and scipy.stats (why not Evidently: see README, Monitoring).

Every test reports an effect size next to its p-value, and thresholds are on the effect size: with
100k captured requests any difference is "significant", so a p-value alone would page on noise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

PSI_EPS = 1e-4  # a bin empty on one side would make PSI infinite
MAX_CATEGORIES = 20  # a length with at most this many distinct values is binned by value


def _bins(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares of `ref` and `cur` per bin: by value when few, else by the reference's deciles."""
    values = np.unique(np.concatenate([ref, cur]))
    if len(values) <= MAX_CATEGORIES:
        edges = np.concatenate([values - 0.5, [values[-1] + 0.5]])
    else:
        qs = np.unique(np.quantile(ref, np.linspace(0, 1, 11)))
        edges = np.concatenate([[-np.inf], qs[1:-1], [np.inf]]) if len(qs) > 2 else np.array([-np.inf, qs[0], np.inf])
    r = np.histogram(ref, edges)[0].astype(float)
    c = np.histogram(cur, edges)[0].astype(float)
    return r / max(r.sum(), 1), c / max(c.sum(), 1)


def psi(ref: Sequence[float], cur: Sequence[float]) -> float:
    """Population stability index of `cur` against `ref` (0.1: moderate shift, 0.25: major)."""
    if not len(ref) or not len(cur):
        return 0.0
    r, c = _bins(np.asarray(ref, float), np.asarray(cur, float))
    r, c = np.clip(r, PSI_EPS, None), np.clip(c, PSI_EPS, None)
    return float(np.sum((c - r) * np.log(c / r)))


def ks(ref: Sequence[float], cur: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (statistic D, p-value)."""
    from scipy.stats import ks_2samp

    if not len(ref) or not len(cur):
        return 0.0, 1.0
    res = ks_2samp(np.asarray(ref, float), np.asarray(cur, float))
    return float(res.statistic), float(res.pvalue)


def char_drift(ref_counts: Counter[str], cur_counts: Counter[str]) -> dict[str, Any]:
    """Characters of the traffic against the reference's: chi-square goodness of fit (p-value)
    and the Jensen-Shannon distance (base 2: 0 same, 1 disjoint) as the effect size."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chisquare

    chars = sorted(set(ref_counts) | set(cur_counts))
    if not chars or not sum(cur_counts.values()) or not sum(ref_counts.values()):
        return {"js": 0.0, "chi2": 0.0, "p_value": 1.0, "new_chars": []}
    r = np.array([ref_counts.get(ch, 0) for ch in chars], float) + 0.5  # unseen chars stay possible
    c = np.array([cur_counts.get(ch, 0) for ch in chars], float)
    expected = r / r.sum() * c.sum()
    res = chisquare(c, expected)
    js = float(jensenshannon(r / r.sum(), c / c.sum(), base=2))
    new = sorted((ch for ch in cur_counts if ch not in ref_counts), key=lambda ch: -cur_counts[ch])
    p = float(res.pvalue)
    return {"js": js if math.isfinite(js) else 0.0, "chi2": float(res.statistic), "p_value": p, "new_chars": new[:10]}


def char_counts(texts: Sequence[str]) -> Counter[str]:
    return Counter("".join(texts))


def domain_auc(ref: np.ndarray, cur: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """How well a classifier tells traffic from reference by embedding: cross-validated AUC of a
    nearest-centroid classifier (0.5: indistinguishable, 1: disjoint). Linear and deterministic."""
    from scipy.stats import mannwhitneyu

    x = np.concatenate([ref, cur]).astype(float)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    y = np.concatenate([np.zeros(len(ref)), np.ones(len(cur))])
    order = np.random.default_rng(seed).permutation(len(x))
    score = np.zeros(len(x))
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        c1 = x[train][y[train] == 1].mean(axis=0)
        c0 = x[train][y[train] == 0].mean(axis=0)
        score[test] = x[test] @ (c1 - c0)
    u = mannwhitneyu(score[y == 1], score[y == 0]).statistic
    return float(u / (len(cur) * len(ref)))


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else None


def histogram(ref: Sequence[float], cur: Sequence[float], buckets: int = 12) -> dict[str, Any]:
    """Shares per length bucket on both sides: the report's chart."""
    both = np.concatenate([np.asarray(ref, float), np.asarray(cur, float)])
    if not len(both):
        return {"edges": [], "reference": [], "traffic": []}
    hi = float(np.percentile(both, 99)) + 1
    edges = np.unique(np.linspace(0, max(hi, 2), buckets + 1).round())
    r = np.histogram(np.clip(ref, 0, edges[-1] - 0.5), edges)[0].astype(float)
    c = np.histogram(np.clip(cur, 0, edges[-1] - 0.5), edges)[0].astype(float)
    return {
        "edges": [int(e) for e in edges],
        "reference": [round(v, 4) for v in (r / max(r.sum(), 1)).tolist()],
        "traffic": [round(v, 4) for v in (c / max(c.sum(), 1)).tolist()],
    }
