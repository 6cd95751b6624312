"""Live analysis of a rollout step (mlops/rollout_analysis.py): the statistics against known values,
the decisions (pass, fail, extend, replay) on windows built by hand, the SLO check, and the config.
(The same judge on capture records written by a real server under a real client: test_live_analysis.py.)"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from mlops.config import GuardrailsCfg, RolloutCfg
from mlops.errors import ConfigError
from mlops.evals.metrics import JsonValid, Length, Regex
from mlops.monitor.compare import above, binomial_above, mann_whitney, normal_sf, two_proportion_z
from mlops.rollout_analysis import LiveWindow, Side, check_slo, judge_step, slo_verdict


def test_two_proportion_z_matches_the_textbook_value() -> None:
    # 30/100 vs 20/100: pooled 0.25, se = sqrt(0.25 * 0.75 * (1/100 + 1/100)) = 0.061237, z = 1.63299
    t = two_proportion_z(30, 100, 20, 100)
    assert t.statistic == pytest.approx(1.632993, abs=1e-6)
    assert t.p_value == pytest.approx(0.051235, abs=1e-6)  # one-sided: Phi(-1.633)
    assert two_proportion_z(20, 100, 30, 100).p_value == pytest.approx(1 - 0.051235, abs=1e-6)
    assert normal_sf(1.959964) == pytest.approx(0.025, abs=1e-7)
    # no evidence either way: no errors on both sides, or a side without requests
    assert two_proportion_z(0, 500, 0, 500).p_value == 1.0
    assert two_proportion_z(3, 10, 0, 0).p_value == 1.0


def test_mann_whitney_matches_the_exact_small_sample_value() -> None:
    # scipy's documented example (Conover): U = 17, two-sided p = 0.1111, so one-sided 0.0556
    t = mann_whitney([19, 22, 16, 29, 24], [20, 11, 17, 12])
    assert t.statistic == 17.0 and t.p_value == pytest.approx(1 / 18, abs=1e-9)
    assert t.effect == pytest.approx(17 / 20)
    # the other direction is not significant: the test is one-sided
    assert mann_whitney([20, 11, 17, 12], [19, 22, 16, 29, 24]).p_value > 0.9


def test_the_tail_test_sees_a_slow_5_percent_that_the_rank_test_misses() -> None:
    rng = random.Random(0)
    prod = [rng.gauss(0.10, 0.01) for _ in range(2000)]
    cand = [rng.gauss(0.10, 0.01) * (5 if i % 20 == 0 else 1) for i in range(2000)]  # 5% five times slower
    assert above(cand, prod).p_value < 1e-6
    assert mann_whitney(cand, prod).p_value > 0.001  # the median moved little
    assert above(prod, prod).p_value > 0.4


# ------------------------------------------------------------------------------ judging a step


def side(release: str, n: int, errors: int = 0, latency: float = 0.1, outputs: list[str] | None = None) -> Side:
    """`n` requests, `errors` of them 500s, spread evenly; latencies around `latency` (seeded)."""
    rng = random.Random(hash(release) % 1000)
    s = Side(release)
    for i in range(n):
        bad = errors and i % max(1, n // errors) == 0 and s.errors < errors
        text = outputs[i % len(outputs)] if outputs else "ok"
        rec: dict[str, Any] = {"id": f"{release}-{i}", "status": 500 if bad else 200, "prompt": f"q{i}="}
        rec |= {"latency_s": latency * rng.uniform(0.8, 1.2), "output": text, "output_len": len(text)}
        s.add(rec)
    return s


def window(c: Side, p: Side, source: str = "live") -> LiveWindow:
    return LiveWindow(0.0, 60.0, c, p, source)  # type: ignore[arg-type]


def cfg(**analysis: Any) -> RolloutCfg:
    return RolloutCfg.model_validate({"analysis": analysis})


def test_a_clean_candidate_passes_and_each_check_says_why() -> None:
    v = judge_step(window(side("c", 200), side("p", 200)), cfg(), step=2, percent=50)
    assert v.decision == "pass" and v.passed and v.outcome == "pass", v.reasons
    assert [c["name"] for c in v.checks] == ["error_rate", "latency"]
    assert all(c["status"] == "pass" for c in v.checks)
    assert v.candidate["requests"] == 200 and v.decided_by == "controller:analysis"
    assert v.to_json()["verdict"] == "pass" and v.to_json()["checks"] == v.checks


def test_more_errors_than_production_fails_on_the_z_test_under_the_absolute_ceiling() -> None:
    # 4/200 = 2.0% is not over max_error_rate (2%): only the comparison with production can fail it
    v = judge_step(window(side("c", 200, errors=4), side("p", 2000)), cfg())
    err = v.checks[0]
    assert v.decision == "fail" and err["status"] == "fail" and "p=" in err["why"], v.checks
    assert err["p_value"] < err["alpha"] / 2 and err["alpha"] == 0.025  # alpha 0.05 over two checks, two tests
    # the same counts on both sides: nothing to fail on
    assert judge_step(window(side("c", 200, errors=2), side("p", 200, errors=2)), cfg()).decision == "pass"


def test_the_absolute_error_ceiling_holds_on_the_evidence() -> None:
    # as many errors as production, but 6% against a 2% ceiling: P(X >= 12 | 200, 2%) ~ 1e-4
    v = judge_step(window(side("c", 200, errors=12), side("p", 200, errors=12)), cfg())
    assert v.decision == "fail" and "over max_error_rate 2.0%" in v.checks[0]["why"], v.checks
    assert v.checks[0]["ceiling_p_value"] == pytest.approx(binomial_above(12, 200, 0.02).p_value, abs=1e-6)
    # 2 in 60 is over 2%, and likely from a release failing 1%: P(X >= 2 | 60, 2%) = 0.34
    assert judge_step(window(side("c", 60, errors=2), side("p", 60, errors=2)), cfg()).decision == "pass"


def test_binomial_above_matches_the_exact_tail() -> None:
    # P(X >= 3 | n=10, p=0.1) = 1 - (0.9^10 + 10 * 0.1 * 0.9^9 + 45 * 0.01 * 0.9^8) = 0.0701908
    assert binomial_above(3, 10, 0.1).p_value == pytest.approx(0.0701908, abs=1e-7)
    assert binomial_above(0, 10, 0.1).p_value == pytest.approx(1.0)


def test_a_step_fails_a_candidate_as_good_as_production_at_most_alpha_of_the_time() -> None:
    """300 seeded steps where both releases draw from one distribution (1% errors, the same latencies
    and answers): the share failed stays within alpha (+ 3 standard errors of the simulation)."""
    rng = random.Random(7)

    def draw(release: str, n: int = 100) -> Side:
        s = Side(release)
        for i in range(n):
            out = '{"a": 1}' if rng.random() < 0.9 else "{oops"
            rec = {"id": f"{release}{i}", "status": 500 if rng.random() < 0.01 else 200, "prompt": "q="}
            s.add(rec | {"latency_s": rng.lognormvariate(-2.3, 0.5), "output": out, "output_len": len(out)})
        return s

    sims, c = 300, cfg(alpha=0.05)
    failed = sum(judge_step(window(draw("c"), draw("p")), c, [JsonValid({})]).decision == "fail" for _ in range(sims))
    assert failed / sims <= 0.05 + 3 * (0.05 * 0.95 / sims) ** 0.5, failed


def test_a_slower_candidate_fails_only_when_the_slowdown_is_significant() -> None:
    slow = judge_step(window(side("c", 100, latency=0.5), side("p", 100, latency=0.1)), cfg())
    assert slow.decision == "fail" and slow.checks[1]["status"] == "fail", slow.checks
    # over the ratio but on eight requests a side, nothing in the data: the step waits for more
    few = judge_step(window(side("c", 3, latency=0.5), side("p", 3, latency=0.1)), cfg())
    assert few.decision == "extend" and few.checks[1]["status"] == "insufficient"


def test_too_little_traffic_extends_then_fails_or_asks_for_a_replay() -> None:
    thin = window(side("c", 10), side("p", 90))
    assert judge_step(thin, cfg(max_extensions=2), extensions=0).decision == "extend"
    assert judge_step(thin, cfg(max_extensions=2), extensions=1).decision == "extend"
    last = judge_step(thin, cfg(max_extensions=2), extensions=2)
    assert last.decision == "fail" and "too little live traffic after 2 extensions" in last.reasons[0]
    replay = judge_step(thin, cfg(max_extensions=2, on_insufficient_traffic="replay"), extensions=2)
    assert replay.decision == "replay" and not replay.passed
    # a replayed window short of requests is not extended again
    assert judge_step(window(side("c", 10), side("p", 10), "replay"), cfg(), extensions=0).decision == "fail"
    # but a real failure is not waited on: 5 errors out of 10 against none out of 90
    assert judge_step(window(side("c", 10, errors=5), side("p", 90)), cfg()).decision == "fail"


def test_production_without_traffic_at_100_percent_is_compared_on_its_baseline() -> None:
    v = judge_step(window(side("c", 200, latency=0.5), Side("p")), cfg(), baseline=side("p", 200, latency=0.1))
    assert v.decision == "fail" and v.production["requests"] == 200 and "earlier window" in v.notes[0]


def test_live_metrics_compare_answers_in_their_worse_direction() -> None:
    json_ok, json_bad = ['{"a": 1}'], ['{"a": 1}'] * 7 + ["{oops"] * 3
    regex = Regex({"pattern": r"^\{"})
    good = judge_step(window(side("c", 200, outputs=json_ok), side("p", 200, outputs=json_ok)), cfg(), [JsonValid({})])
    assert good.decision == "pass" and good.checks[2]["name"] == "metric.json_valid", good.checks
    bad = judge_step(window(side("c", 200, outputs=json_bad), side("p", 200, outputs=json_ok)), cfg(), [JsonValid({})])
    assert bad.decision == "fail" and bad.checks[2]["status"] == "fail" and bad.checks[2]["candidate"] == 0.7
    assert bad.checks[2]["alpha"] == pytest.approx(0.05 / 3)
    # longer answers are worse for `length` (lower is better), and the tolerance is respected
    longer = window(side("c", 200, outputs=["x" * 40]), side("p", 200, outputs=["x" * 10]))
    assert judge_step(longer, cfg(), [Length({})]).decision == "fail"
    assert judge_step(longer, cfg(max_metric_drop={"length": 50}), [Length({})]).decision == "pass"
    shorter = window(side("c", 200, outputs=["x" * 10]), side("p", 200, outputs=["x" * 40]))
    assert judge_step(shorter, cfg(), [Length({}), regex]).decision == "pass"


def test_a_metric_scores_at_most_its_sample_and_needs_min_samples() -> None:
    w = window(side("c", 300, outputs=["{}"]), side("p", 300, outputs=["{}"]))
    v = judge_step(w, cfg(sample=40, min_samples=30), [JsonValid({})])
    assert v.checks[2]["n"] == [40, 40] and v.decision == "pass"
    thin = window(side("c", 25, outputs=["{}"]), side("p", 25, outputs=["{}"]))
    few = judge_step(thin, cfg(min_requests=20, min_samples=30), [JsonValid({})])
    assert [c["status"] for c in few.checks] == ["pass", "pass", "insufficient"] and few.decision == "extend"
    # a judge metric is scored on judge_sample answers and needs only that many
    judged = judge_step(w, cfg(judge_sample=5), [JsonValid({})], judge_metrics=["json_valid"])
    assert judged.checks[2]["n"] == [5, 5]


# ------------------------------------------------------------------------------ SLOs


def test_check_slo_names_each_breach() -> None:
    g = GuardrailsCfg.model_validate({"max_error_rate": 0.02, "max_p95_ms": 300, "monitor": {"empty_rate": 0.1}})
    assert check_slo(window(side("c", 100), side("p", 100)), g) == []
    breaches = check_slo(window(side("c", 100, errors=5, latency=0.5, outputs=["", "a"]), Side("p")), g, 0.1)
    assert len(breaches) == 4, breaches
    assert breaches[0].startswith("error rate 5.0% (5/100) > 2.0%")
    assert any("p95" in b and "> 300 ms" in b for b in breaches)
    assert any("x previous 100.0 ms" in b for b in breaches)
    assert "empty_rate 0.4737 > 0.1" in breaches  # 45 of the 95 answered are empty
    # too few requests to judge: no breach is claimed
    assert check_slo(window(side("c", 10, errors=5), Side("p")), g) == []
    # the same as a guardrail's verdict
    v = slo_verdict(window(side("c", 100, errors=5), Side("p")), g)
    assert (v.decision, v.decided_by, v.reasons) == ("fail", "controller:guardrail", ["error rate 5.0% (5/100) > 2.0%"])
    assert slo_verdict(window(side("c", 10), Side("p")), g).decision == "extend"
    assert slo_verdict(window(side("c", 100), Side("p")), g).passed
    drift = GuardrailsCfg.model_validate({"monitor": {"output_length_psi": 0.2}})
    long = window(side("c", 100, outputs=["x" * 30]), side("p", 100, outputs=["x" * 5]))
    assert check_slo(long, drift)[0].startswith("output_length_psi")
    # after promotion the previous production has no traffic: its last canary window is the reference
    promoted = window(side("c", 100, outputs=["x" * 30], latency=0.5), Side("p"))
    assert check_slo(promoted, drift) == []  # nothing to compare with
    before = side("p", 100, outputs=["x" * 5], latency=0.1)
    found = check_slo(promoted, drift, baseline=before)
    assert len(found) == 2 and "> 2 x previous" in found[0] and found[1].startswith("output_length_psi"), found


def test_guardrail_statistics_and_analysis_metrics_are_checked(project: Any) -> None:
    from mlops.config import load

    with pytest.raises(ValueError, match="unknown guardrail statistic 'empty'"):
        GuardrailsCfg.model_validate({"monitor": {"empty": 0.1}})
    with pytest.raises(
        ConfigError, match=r"deploy.rollout.analysis.metrics.0: eval 'heldout' has no metric 'json_vald'"
    ):
        load(project / "mlops.yaml", ["deploy.rollout.analysis.metrics=[json_vald]"])
    with pytest.raises(ConfigError, match="needs an expected answer"):
        load(project / "mlops.yaml", ["deploy.rollout.analysis.metrics=[exact_match]"])
    with pytest.raises(ConfigError, match="analysis.max_metric_drop.lenght: eval 'heldout' has no metric 'lenght'"):
        load(project / "mlops.yaml", ["deploy.rollout.analysis.max_metric_drop={lenght: 3}"])
    with pytest.raises(ConfigError, match="analysis.suite: unknown eval 'nope'"):
        load(project / "mlops.yaml", ["deploy.rollout.analysis.suite=nope"])
    ok = load(
        project / "mlops.yaml",
        ["evals.heldout.metrics=[exact_match, latency, json_valid]", "deploy.rollout.analysis.metrics=[json_valid]"],
    )
    assert ok.cfg.deploy.rollout.analysis.metrics == ["json_valid"]


# ------------------------------------------------------------------------------ reading windows


def test_a_window_reader_parses_each_capture_file_once_and_lists_only_the_days_it_needs(tmp_path: Any) -> None:
    from mlops.monitor.capture import chunk_key
    from mlops.monitor.record import encode
    from mlops.monitor.traffic import capture_keys
    from mlops.registry.store import LocalStore
    from mlops.rollout_analysis import WindowReader

    store = LocalStore(tmp_path / "s")
    now = time.time()

    def batch(t: float, n: int, release: str, status: int = 200) -> str:
        recs = [
            {"id": f"{release}-{t}-{i}", "time": t + i * 0.01, "release": release, "status": status, "latency_s": 0.1}
            for i in range(n)
        ]
        key = chunk_key(recs[0]["time"], recs[-1]["time"], "local")
        store.put(key, b"".join(encode(r) for r in recs))
        return key

    old = batch(now - 5 * 86400, 10, "c")  # five days ago: not even listed for a window of today
    batch(now - 60, 20, "c")
    batch(now - 59, 30, "p")
    batch(now - 58, 7, "x")  # another release: counted, not kept
    assert old not in capture_keys(store, now - 120, now) and old in capture_keys(store)
    reader = WindowReader(store, "c", "p")
    w = reader.read(now - 120, now)
    assert (w.candidate.requests, w.production.requests, w.capture["other"], w.capture["files"]) == (20, 30, 7, 3)
    batch(now - 30, 5, "c", status=503)
    w2 = reader.read(now - 120, now)
    assert (w2.candidate.requests, w2.candidate.errors) == (25, 5) and len(reader._files) == 4
    # a narrower window over the same parsed files: records outside it are left out
    assert reader.read(now - 45, now).candidate.requests == 5
    assert len(reader._files) == 1, "files that left the window are let go (a 30-minute bake kept them all)"
    assert reader.read(now - 120, now).candidate.requests == 25  # asked again: parsed again
