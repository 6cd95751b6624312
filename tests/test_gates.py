"""Gates on result documents: absolute bounds, pass rates, latency SLOs, paired no-regression.

Pure: results are built here, as the harness returns them (EvalResult), so each test states the
per-case numbers it gates on.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from mlops.config import GateCfg
from mlops.contracts import CaseRow, EvalResult, MetricSummary
from mlops.evals.gates import GateResult, check_gates
from mlops.evals.stats import aggregate, paired_bootstrap


def result(
    values: dict[str, float] | list[float], metric: str = "m", higher: bool = True, failed: set[str] | None = None
) -> EvalResult:
    vals = values if isinstance(values, dict) else {f"c{i}": v for i, v in enumerate(values)}
    failed = failed or set()
    cases = [
        CaseRow(
            id=k,
            input=k,
            expected=None,
            output="",
            latency_s=0.0,
            error=None,
            scores={metric: v},
            reasons={},
            failed=[metric] if k in failed else [],
        )
        for k, v in vals.items()
    ]
    xs = list(vals.values())
    summary = MetricSummary(
        higher_is_better=higher,
        n=len(xs),
        failed=len(failed),
        **{st: aggregate(xs, st) for st in ("mean", "p50", "p95", "p99")},
    )
    return EvalResult(
        suite="s", release="r", n=len(cases), metrics={metric: summary}, metric_names=[metric], cases=cases
    )


def gate(**kw: Any) -> GateCfg:
    return GateCfg(**({"eval": "s", "metric": "m"} | kw))


def one(g: GateCfg, cand: EvalResult, prod: EvalResult | None = None) -> GateResult:
    (res,) = check_gates([g], {"s": cand}, {"s": prod})
    return res


def binary(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


# ---------------------------------------------------------------------------- absolute


def test_absolute_min_and_max() -> None:
    cand = result([1, 1, 0, 1])
    ok = one(gate(min=0.5), cand)
    assert (ok.passed, ok.candidate, ok.kind, ok.threshold) == (True, 0.75, "absolute", ">= 0.5")
    assert ok.reason == "mean 0.75 is within min 0.5"
    low = one(gate(min=0.8), cand)
    assert not low.passed and low.reason == "mean 0.75 is below the minimum 0.8"
    high = one(gate(max=0.7), cand)
    assert not high.passed and high.reason == "mean 0.75 is above the maximum 0.7"


def test_pass_rate_gate_counts_cases_at_the_threshold() -> None:
    scores = [0.9] * 180 + [0.5] * 20
    g = gate(stat="pass_rate", threshold=0.8, min=0.9)
    r = one(g, result(scores))
    assert r.passed and r.candidate == pytest.approx(0.9)
    assert r.name == "s.m pass_rate@0.8"
    assert "180/200 cases >= 0.8" in r.reason
    assert not one(gate(stat="pass_rate", threshold=0.8, min=0.95), result(scores)).passed


def test_pass_rate_of_a_lower_is_better_metric_and_failed_cases() -> None:
    lat = {f"c{i}": 0.2 for i in range(9)} | {"c9": 0.1}
    g = gate(metric="latency", stat="pass_rate", threshold=0.5, min=1.0)
    assert one(g, result(lat, "latency", higher=False)).passed  # every case <= 0.5 s
    # a failed case never passes, whatever value it carries
    r = one(g, result(lat, "latency", higher=False, failed={"c9"}))
    assert not r.passed and r.candidate == pytest.approx(0.9) and "9/10 cases <= 0.5" in r.reason


def test_latency_slo_on_p95() -> None:
    lat = [0.1] * 90 + [0.5] * 5 + [3.0] * 5  # p95 sits at the edge of the slow tail
    p95 = aggregate(lat, "p95")
    assert 0.5 <= p95 <= 3.0
    g_ok = gate(metric="latency", stat="p95", max=p95 + 0.01)
    g_bad = gate(metric="latency", stat="p95", max=p95 - 0.01)
    assert one(g_ok, result(lat, "latency", higher=False)).passed
    r = one(g_bad, result(lat, "latency", higher=False))
    assert not r.passed and r.reason.startswith(f"p95 {p95:.4g} is above the maximum")
    assert one(gate(metric="latency", stat="p50", max=0.2), result(lat, "latency", higher=False)).passed


# ---------------------------------------------------------------------------- no regression


def test_noise_within_the_margin_does_not_fail() -> None:
    for seed in range(10):  # many draws: a gate that fails on noise would fail on some of them
        prod_vals = binary(200, 0.7, seed)
        rng = random.Random(100 + seed)
        cand_vals = list(prod_vals)
        ones = [i for i, v in enumerate(prod_vals) if v == 1.0]
        zeros = [i for i, v in enumerate(prod_vals) if v == 0.0]
        for i in rng.sample(ones, 6):  # 6 cases got worse ...
            cand_vals[i] = 0.0
        for i in rng.sample(zeros, 3):  # ... 3 got better: -1.5 points, margin 5
            cand_vals[i] = 1.0
        r = one(gate(max_regression=0.05), result(cand_vals), result(prod_vals))
        assert r.passed, r.reason
        assert r.delta == pytest.approx(-0.015)
        assert r.interval is not None and r.interval[0] < r.delta < r.interval[1]
        assert r.reason == "worse by 0.015, within the allowed 0.05 (200 paired cases)"


def test_a_regression_beyond_the_margin_fails() -> None:
    prod_vals = binary(200, 0.7, 1)
    cand_vals = list(prod_vals)
    ones = [i for i, v in enumerate(prod_vals) if v == 1.0]
    for i in random.Random(7).sample(ones, 30):  # -15 points, margin 5
        cand_vals[i] = 0.0
    r = one(gate(max_regression=0.05, confidence=0.95), result(cand_vals), result(prod_vals))
    assert not r.passed
    assert r.delta == pytest.approx(-0.15)
    assert r.interval is not None and r.interval[1] < -0.05  # even the optimistic end is beyond the margin
    assert r.reason.startswith("worse by 0.15; at 95% confidence by at least 0.")
    assert r.reason.endswith("more than the allowed 0.05 (200 paired cases)")


def test_a_small_suite_cannot_fail_on_two_cases() -> None:
    prod_vals = [1.0] * 20
    cand_vals = [0.0, 0.0] + [1.0] * 18  # -10 points, but only 2 cases of 20
    r = one(gate(max_regression=0.05), result(cand_vals), result(prod_vals))
    assert r.passed and "not beyond the allowed 0.05 at 95% confidence" in r.reason


def test_higher_confidence_is_harder_to_fail() -> None:
    prod_vals = binary(300, 0.7, 3)
    cand_vals = list(prod_vals)
    ones = [i for i, v in enumerate(prod_vals) if v == 1.0]
    for i in random.Random(5).sample(ones, 27):  # -9 points against a 5-point margin
        cand_vals[i] = 0.0
    lo_conf = one(gate(max_regression=0.05, confidence=0.6), result(cand_vals), result(prod_vals))
    hi_conf = one(gate(max_regression=0.05, confidence=0.999), result(cand_vals), result(prod_vals))
    assert not lo_conf.passed and hi_conf.passed


def test_lower_is_better_direction() -> None:
    rng = random.Random(0)
    prod = {f"c{i}": 0.2 + 0.05 * rng.random() for i in range(100)}
    slower = {k: v + 0.3 for k, v in prod.items()}
    faster = {k: v - 0.1 for k, v in prod.items()}
    g = gate(metric="latency", max_regression=0.1)
    r = one(g, result(slower, "latency", False), result(prod, "latency", False))
    assert not r.passed and r.delta == pytest.approx(0.3) and r.reason.startswith("worse by 0.3")
    r = one(g, result(faster, "latency", False), result(prod, "latency", False))
    assert r.passed and r.delta == pytest.approx(-0.1) and r.reason == "better by 0.1 (100 paired cases)"
    # the same numbers on a higher-is-better metric mean the opposite
    r = one(gate(max_regression=0.1), result(faster), result(prod))
    assert r.passed and r.reason.startswith("worse by 0.1,")
    assert not one(gate(max_regression=0.05), result(faster), result(prod)).passed


def test_p95_regression_is_paired_too() -> None:
    rng = random.Random(1)
    prod = {f"c{i}": rng.uniform(0.1, 0.3) for i in range(200)}
    slow_tail = dict(prod)
    for k in list(prod)[:30]:  # 15% of cases get 1 s slower: p95 jumps
        slow_tail[k] += 1.0
    g = gate(metric="latency", stat="p95", max_regression=0.2)
    r = one(g, result(slow_tail, "latency", False), result(prod, "latency", False))
    assert not r.passed and r.delta is not None and r.delta > 0.5
    assert (
        one(g, result(prod, "latency", False), result(prod, "latency", False)).reason == "no change (200 paired cases)"
    )


def test_pass_rate_regression() -> None:
    prod = [0.9] * 100
    cand = [0.9] * 80 + [0.1] * 20
    g = gate(stat="pass_rate", threshold=0.5, max_regression=0.05)
    r = one(g, result(cand), result(prod))
    assert not r.passed and r.delta == pytest.approx(-0.2)


def test_cases_are_paired_by_id_not_by_position() -> None:
    prod = {f"c{i}": float(i % 2) for i in range(100)}
    cand = dict(reversed(list(prod.items()))) | {"new-case": 0.0}  # same scores, other order, one more case
    r = one(gate(max_regression=0.0), result(cand), result(prod))
    assert r.passed and r.delta == 0.0 and r.n == 100 and r.reason == "no change (100 paired cases)"


def test_first_release_and_missing_data() -> None:
    r = one(gate(max_regression=0.05), result([1, 0]), None)
    assert r.passed and r.reason == "no production results to compare with (first release)"
    r = one(gate(max_regression=0.05), result([1, 0]), result({"other": 1.0}))
    assert r.passed and r.reason.startswith("no cases in common")
    (missing,) = check_gates([gate(min=0.5)], {}, {"s": None})
    assert not missing.passed and missing.reason == "suite was not evaluated"
    (no_metric,) = check_gates([gate(metric="absent", min=0.5)], {"s": result([1.0])}, {"s": None})
    assert not no_metric.passed and no_metric.reason == "metric absent is not in the results"


def test_one_gate_with_both_checks_reports_both() -> None:
    g = gate(min=0.9, max_regression=0.05)
    results = check_gates([g], {"s": result([1.0] * 50)}, {"s": result([1.0] * 50)})
    assert [(r.kind, r.passed) for r in results] == [("absolute", True), ("regression", True)]


def test_bootstrap_interval_is_reproducible_and_covers_the_delta() -> None:
    c, p = binary(150, 0.6, 1), binary(150, 0.6, 2)
    a, b = paired_bootstrap(c, p, 0.9), paired_bootstrap(c, p, 0.9)
    assert a == b and a.low <= a.delta <= a.high and a.n == 150
    assert paired_bootstrap([1.0, 1.0], [0.0, 0.0], 0.9).low == 1.0  # every pair moved alike: no spread
