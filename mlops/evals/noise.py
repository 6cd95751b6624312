"""How much of a verdict is noise: a judge's spread over repeats, flaky cases, and the smallest
regression a suite can resolve (its minimum detectable effect, MDE).

- **Spread**: a judge metric with `repeat: N` stores the N values of each case (`CaseRow.samples`);
  their range is the judge's disagreement with itself on that case.
- **Flaky**: a case whose verdict (score on which side of the pass threshold) flips between a judge's
  repeats, or between two releases with identical weights (the same artifact sha256 evaluated
  twice: any difference is the evaluation's noise, not the model's). `evals.<suite>.quarantine`
  and `gates[].exclude_flaky` keep such cases out of a gate; the report still lists them.
- **MDE**: before a run, from production's stored per-case values alone. A candidate is modelled
  as a fresh draw of each case from the distribution production's cases show (no correlation
  assumed between the two releases: the conservative end, since a retrained model's cases usually
  agree with its predecessor's). The paired difference of means then has standard error
  sd·sqrt(2/n), and a regression is detected when the gate's one-sided `confidence` bound excludes
  no change; detected with probability `power` (0.8) at

      MDE = (z_confidence + z_power) · sd · sqrt(2 / n)

  A `max_regression` below the MDE promises a resolution the suite cannot deliver: `mlops plan`
  and the report warn. tests/test_noise.py checks the formula against a simulation of the gate's
  own paired bootstrap over stored scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from mlops.config import GateCfg
from mlops.contracts import EvalResult

POWER = 0.8  # the usual design power: a regression of the MDE is caught 4 times in 5
DEFAULT_THRESHOLD = 0.5  # a case's verdict when no pass_rate gate names a threshold: score >= 0.5 passes


def mde(values: Sequence[float], confidence: float, power: float = POWER) -> float | None:
    """The smallest drop in the mean of `values` the paired gate detects with probability `power`
    at one-sided `confidence` (formula in the module docstring). None with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)  # ddof 0, as the bootstrap's
    z = NormalDist().inv_cdf(confidence) + NormalDist().inv_cdf(power)
    return z * sd * math.sqrt(2.0 / n)


def gate_values(result: EvalResult, g: GateCfg, exclude: Iterable[str] = ()) -> list[float] | None:
    """What a gate's bootstrap would resample on `result`: the metric's values (0/1 pass indicators
    for pass_rate) over the gate's segment, without `exclude`. None for a percentile statistic
    (no MDE formula) or a metric the result lacks."""
    from mlops.evals.gates import Sample

    if g.stat not in ("mean", "pass_rate"):
        return None
    sample = Sample.of(result, g.metric, g.segment)
    if sample is None:
        return None
    drop = set(exclude)
    ids = [i for i in sample.values if i not in drop]
    return sample.series(g.stat, g.threshold, ids)


def thresholds(gates: Sequence[GateCfg], suite: str) -> dict[str, float]:
    """metric -> the value a case must reach to pass, from the suite's pass_rate gates."""
    out: dict[str, float] = {}
    for g in gates:
        if g.eval == suite and g.stat == "pass_rate" and g.threshold is not None:
            out.setdefault(g.metric, g.threshold)
    return out


@dataclass(frozen=True)
class Flaky:
    suite: str
    metric: str
    id: str
    why: str


def _passes(v: float, t: float, higher_is_better: bool) -> bool:
    return v >= t if higher_is_better else v <= t


def flaky_cases(result: EvalResult, limits: dict[str, float], identical: Sequence[EvalResult] = ()) -> list[Flaky]:
    """Cases of `result` whose verdict flips between a judge's repeats, or against a result of a
    release with identical weights (`identical`). `limits`: metric -> pass threshold (else 0.5)."""
    out: dict[tuple[str, str], Flaky] = {}
    for c in result.cases:
        for metric, samples in c.samples.items():
            hib = result.metrics[metric].higher_is_better if metric in result.metrics else True
            t = limits.get(metric, DEFAULT_THRESHOLD)
            verdicts = {_passes(v, t, hib) for v in samples}
            if len(verdicts) > 1:
                shown = ", ".join(f"{v:.3g}" for v in samples)
                out[(c.id, metric)] = Flaky(result.suite, metric, c.id, f"repeats disagree ({shown}; passes at {t:g})")
    for other in identical:
        theirs = {c.id: c for c in other.cases}
        for c in result.cases:
            o = theirs.get(c.id)
            if o is None:
                continue
            for metric, v in c.scores.items():
                if metric not in o.scores or metric == "latency" or (c.id, metric) in out:
                    continue
                hib = result.metrics[metric].higher_is_better if metric in result.metrics else True
                t = limits.get(metric, DEFAULT_THRESHOLD)
                if _passes(v, t, hib) != _passes(o.scores[metric], t, hib):
                    why = f"{v:.3g} here, {o.scores[metric]:.3g} on {other.release} (identical weights)"
                    out[(c.id, metric)] = Flaky(result.suite, metric, c.id, why)
    return list(out.values())


def spread(samples: Sequence[float]) -> float:
    return max(samples) - min(samples) if samples else 0.0
