"""Gates: absolute thresholds, pass rates, latency SLOs, and no-regression against production.

A no-regression gate compares the candidate with production's *stored* results on the same cases
(matched by id) with a paired bootstrap, and fails only when it is confident, at the declared
level, that the candidate is worse than production by more than `max_regression`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlops.config import GateCfg
from mlops.evals.stats import aggregate, paired_bootstrap


@dataclass
class GateResult:
    name: str
    eval: str
    metric: str
    stat: str
    kind: str  # absolute | regression
    candidate: float | None
    production: float | None
    delta: float | None
    interval: tuple[float, float] | None
    threshold: str
    passed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _values(result: dict[str, Any], metric: str) -> dict[str, float]:
    return {c["id"]: float(c["scores"][metric]) for c in result["cases"] if metric in c["scores"]}


def check_gates(
    gates: list[GateCfg],
    candidate: dict[str, dict[str, Any]],
    production: dict[str, dict[str, Any] | None],
) -> list[GateResult]:
    out: list[GateResult] = []
    for g in gates:
        res = candidate.get(g.eval)
        stat_name = f"{g.stat}(>={g.threshold:g})" if g.stat == "pass_rate" else g.stat
        label = f"{g.eval}.{g.metric} {stat_name}"
        if res is None:
            out.append(GateResult(label, g.eval, g.metric, g.stat, "absolute", None, None, None, None, "-", False, "suite was not evaluated"))
            continue
        higher = bool(res["metrics"][g.metric]["higher_is_better"])
        cand_vals = _values(res, g.metric)
        cand = aggregate(list(cand_vals.values()), g.stat, g.threshold)
        if g.min is not None or g.max is not None:
            ok = (g.min is None or cand >= g.min) and (g.max is None or cand <= g.max)
            bound = " and ".join(s for s in (f">= {g.min:g}" if g.min is not None else "", f"<= {g.max:g}" if g.max is not None else "") if s)
            out.append(GateResult(label, g.eval, g.metric, g.stat, "absolute", cand, None, None, None, bound, ok,
                                  f"{cand:.4g} {'meets' if ok else 'misses'} {bound}"))
        if g.max_regression is not None:
            out.append(_regression(g, label, higher, cand, cand_vals, production.get(g.eval)))
    return out


def _regression(g: GateCfg, label: str, higher: bool, cand: float, cand_vals: dict[str, float], prod_res: dict[str, Any] | None) -> GateResult:
    margin = float(g.max_regression or 0.0)
    threshold = f"regression <= {margin:g} @ {g.confidence:.0%}"
    if prod_res is None or g.metric not in prod_res.get("metrics", {}):
        return GateResult(label, g.eval, g.metric, g.stat, "regression", cand, None, None, None, threshold, True,
                          "no production results to compare with (first release)")
    prod_vals = _values(prod_res, g.metric)
    common = sorted(set(cand_vals) & set(prod_vals))
    prod = aggregate(list(prod_vals.values()), g.stat, g.threshold)
    sign = 1.0 if higher else -1.0
    if g.stat == "mean" and len(common) >= 2:
        # one-sided bound at `confidence`: the upper end of a two-sided (2c-1) interval
        iv = paired_bootstrap([sign * cand_vals[i] for i in common], [sign * prod_vals[i] for i in common], 2 * g.confidence - 1)
        delta, lo, hi = iv.delta, iv.low, iv.high
        ok = hi >= -margin
        why = (f"change {sign * delta:+.4g}; worst plausible {-hi * 1:+.4g} beyond margin" if not ok
               else f"change {sign * delta:+.4g} over {len(common)} paired cases; interval [{sign * lo:+.4g}, {sign * hi:+.4g}]")
        if not ok:
            why = f"regressed {abs(delta):.4g} (best case {abs(hi):.4g} at {g.confidence:.0%}) > allowed {margin:g}"
        return GateResult(label, g.eval, g.metric, g.stat, "regression", cand, prod, cand - prod,
                          (min(sign * lo, sign * hi), max(sign * lo, sign * hi)), threshold, ok, why)
    better = sign * (cand - prod)
    ok = better >= -margin
    return GateResult(label, g.eval, g.metric, g.stat, "regression", cand, prod, cand - prod, None, threshold, ok,
                      f"change {cand - prod:+.4g} ({'within' if ok else 'beyond'} {margin:g})")
