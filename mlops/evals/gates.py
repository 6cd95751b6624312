"""Gates: absolute thresholds, pass rates, latency SLOs, and no-regression against production.

One gate in mlops.yaml names a suite, a metric and a statistic (`mean`, `p50`, `p95`, `p99`, or
`pass_rate` with a per-case `threshold`), and any of:

- `min` / `max`: an absolute bound on the candidate's statistic (a latency SLO is
  `{metric: latency, stat: p95, max: 2.0}`; a pass-rate gate is
  `{metric: exact_match, stat: pass_rate, threshold: 1, min: 0.9}`);
- `max_regression` (+ `confidence`): a no-regression check against production's *stored* results
  on the same cases (matched by id). A paired bootstrap gives an interval of the change; the gate
  fails only when, at the declared confidence, the candidate is worse than production by more than
  `max_regression` (in the metric's units; the direction follows `higher_is_better`). Noise that
  cannot be told apart from a small change passes; a clear regression beyond the margin fails.

`segment: <tag>` narrows a gate to the cases carrying that tag: its bounds and its bootstrap see only
that slice (production's cases are paired by id with the candidate's slice, so production results
stored before cases had tags still compare). A slice can regress while the overall mean holds.

Each gate gives one GateResult per check, with the numbers and a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlops.config import GateCfg
from mlops.contracts import EvalResult, GateResult
from mlops.evals.stats import aggregate, paired_bootstrap, passes


@dataclass(frozen=True)
class Sample:
    """One metric of one suite's result: per-case values and failure flags, keyed by case id."""

    values: dict[str, float]
    failed: dict[str, bool]
    higher_is_better: bool

    @classmethod
    def of(
        cls, result: EvalResult, metric: str, segment: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> Sample | None:
        """The metric's values, over the cases tagged `segment` only when it is given, less `exclude`."""
        summary = result.metrics.get(metric)
        if summary is None:
            return None
        values: dict[str, float] = {}
        failed: dict[str, bool] = {}
        for c in result.cases:
            if metric in c.scores and (segment is None or segment in c.tags) and c.id not in exclude:
                values[c.id] = c.scores[metric]
                failed[c.id] = metric in c.failed or c.error is not None
        return cls(values, failed, summary.higher_is_better)

    def stat(self, stat: str, threshold: float | None, ids: list[str] | None = None) -> float:
        keys = list(self.values) if ids is None else ids
        return aggregate(
            [self.values[i] for i in keys],
            stat,
            threshold,
            self.higher_is_better,
            [self.failed[i] for i in keys],
        )

    def series(self, stat: str, threshold: float | None, ids: list[str]) -> list[float]:
        """What the bootstrap resamples: the values, or 0/1 pass indicators for pass_rate."""
        if stat != "pass_rate":
            return [self.values[i] for i in ids]
        assert threshold is not None
        return [float(passes(self.values[i], threshold, self.higher_is_better, self.failed[i])) for i in ids]


def label(g: GateCfg) -> str:
    stat = f"pass_rate@{g.threshold:g}" if g.stat == "pass_rate" and g.threshold is not None else g.stat
    seg = f"[{g.segment}]" if g.segment is not None else ""
    return f"{g.eval}.{g.metric}{seg} {stat}"


def segment_tags(result: EvalResult) -> set[str]:
    return {t for c in result.cases for t in c.tags}


def _num(v: float) -> str:
    return f"{v:.4g}"


def check_gates(
    gates: list[GateCfg],
    candidate: dict[str, EvalResult],
    production: dict[str, EvalResult | None],
    quarantine: dict[str, set[str]] | None = None,
    flaky: dict[str, set[str]] | None = None,
) -> list[GateResult]:
    """Every check of every gate. `production` maps suite -> stored result, or None (first release).
    `quarantine` (suite -> case ids) is kept out of every gate on its suite, `flaky` (suite -> case
    ids) out of the gates with `exclude_flaky`: both sides of a regression check drop them."""
    out: list[GateResult] = []
    for g in gates:
        name = label(g)
        res = candidate.get(g.eval)
        drop = set((quarantine or {}).get(g.eval, ()))
        if g.exclude_flaky:
            drop |= (flaky or {}).get(g.eval, set())
        present = {c.id for c in res.cases} if res is not None else set()
        excluded = sorted(drop & present)
        sample = Sample.of(res, g.metric, g.segment, frozenset(drop)) if res is not None else None
        if sample is None or (g.segment is not None and not sample.values):
            if res is None:
                why = "suite was not evaluated"
            elif sample is None:
                why = f"metric {g.metric} is not in the results"
            else:
                why = f"no case of the suite has tag {g.segment!r}"
            out.append(
                GateResult(
                    **_ids(g, name, "absolute"),
                    threshold=_bounds(g),
                    passed=False,
                    reason=why,
                    stat_threshold=g.threshold,
                )
            )
            continue
        checks = []
        if g.min is not None or g.max is not None:
            checks.append(_absolute(g, name, sample))
        if g.max_regression is not None:
            checks.append(_regression(g, name, sample, production.get(g.eval), frozenset(drop)))
        out += [c.model_copy(update={"excluded": excluded}) if excluded else c for c in checks]
    return out


def _ids(g: GateCfg, name: str, kind: str) -> dict[str, Any]:
    """The fields that say which check a GateResult is."""
    return {"name": name, "eval": g.eval, "metric": g.metric, "stat": g.stat, "kind": kind, "segment": g.segment}


def _bounds(g: GateCfg) -> str:
    parts = []
    if g.min is not None:
        parts.append(f">= {g.min:g}")
    if g.max is not None:
        parts.append(f"<= {g.max:g}")
    if g.max_regression is not None:
        parts.append(f"regression <= {g.max_regression:g} @ {g.confidence:.0%}")
    return ", ".join(parts)


def _absolute(g: GateCfg, name: str, s: Sample) -> GateResult:
    value = s.stat(g.stat, g.threshold)
    n = len(s.values)
    low_ok = g.min is None or value >= g.min
    high_ok = g.max is None or value <= g.max
    passed = low_ok and high_ok and n > 0
    what = f"{g.stat} {_num(value)}"
    if g.stat == "pass_rate":
        ok = round(value * n)
        what = f"pass rate {_num(value)} ({ok}/{n} cases {'>=' if s.higher_is_better else '<='} {g.threshold:g})"
    if n == 0:
        reason = "no cases were scored"
    elif not low_ok:
        reason = f"{what} is below the minimum {g.min:g}"
    elif not high_ok:
        reason = f"{what} is above the maximum {g.max:g}"
    else:
        reason = f"{what} is within " + " and ".join(
            b
            for b in (f"min {g.min:g}" if g.min is not None else "", f"max {g.max:g}" if g.max is not None else "")
            if b
        )
    threshold = " and ".join(
        b for b in (f">= {g.min:g}" if g.min is not None else "", f"<= {g.max:g}" if g.max is not None else "") if b
    )
    return GateResult(
        **_ids(g, name, "absolute"),
        candidate=value,
        threshold=threshold,
        passed=passed,
        reason=reason,
        n=n,
        higher_is_better=s.higher_is_better,
        stat_threshold=g.threshold,
    )


def _regression(
    g: GateCfg, name: str, s: Sample, prod_res: EvalResult | None, drop: frozenset[str] = frozenset()
) -> GateResult:
    margin = float(g.max_regression or 0.0)
    threshold = f"regression <= {margin:g} @ {g.confidence:.0%}"
    cand_all = s.stat(g.stat, g.threshold)

    def skip(reason: str) -> GateResult:
        return GateResult(
            **_ids(g, name, "regression"),
            candidate=cand_all,
            threshold=threshold,
            passed=True,
            reason=reason,
            n=len(s.values),
            higher_is_better=s.higher_is_better,
            stat_threshold=g.threshold,
        )

    if prod_res is None:
        return skip("no production results to compare with (first release)")
    p = Sample.of(prod_res, g.metric, exclude=drop)
    if p is None:
        return skip(f"production's stored results have no {g.metric}; nothing to compare")
    ids = sorted(set(s.values) & set(p.values))
    if not ids:
        return skip("no cases in common with production's stored results; nothing to compare")
    cand, prod = s.stat(g.stat, g.threshold, ids), p.stat(g.stat, g.threshold, ids)
    stat = "mean" if g.stat == "pass_rate" else g.stat  # pass_rate = mean of 0/1 pass indicators
    # The two-sided (2c - 1) interval's ends are the one-sided c bounds of the change.
    iv = paired_bootstrap(
        s.series(g.stat, g.threshold, ids), p.series(g.stat, g.threshold, ids), 2 * g.confidence - 1, stat
    )
    sign = 1.0 if s.higher_is_better else -1.0
    worse_by = -sign * iv.delta  # > 0: the candidate is worse
    least_worse = -max(sign * iv.low, sign * iv.high)  # the most favourable end of the interval
    passed = least_worse <= margin
    paired = f"{len(ids)} paired cases" + (f" tagged {g.segment!r}" if g.segment is not None else "")
    if not passed:
        reason = (
            f"worse by {_num(worse_by)}; at {g.confidence:.0%} confidence by at least {_num(least_worse)}, "
            f"more than the allowed {margin:g} ({paired})"
        )
    elif worse_by > margin:
        reason = (
            f"worse by {_num(worse_by)}, but not beyond the allowed {margin:g} at {g.confidence:.0%} "
            f"confidence: too few or too noisy cases ({paired})"
        )
    elif worse_by > 0:
        reason = f"worse by {_num(worse_by)}, within the allowed {margin:g} ({paired})"
    elif worse_by < 0:
        reason = f"better by {_num(-worse_by)} ({paired})"
    else:
        reason = f"no change ({paired})"
    return GateResult(
        **_ids(g, name, "regression"),
        candidate=cand,
        production=prod,
        delta=cand - prod,
        interval=(iv.low, iv.high),
        threshold=threshold,
        passed=passed,
        reason=reason,
        n=len(ids),
        higher_is_better=s.higher_is_better,
        stat_threshold=g.threshold,
    )
