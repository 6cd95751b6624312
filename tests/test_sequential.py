"""The mSPRT behind `mlops experiment`: looking after every observation keeps the false-positive
rate at alpha (where a repeated z-test does not), a planted effect is found in the right direction,
the always-valid interval covers the truth, and a verdict, once reached, stays. Seeded, in-process."""

from __future__ import annotations

import math
import random

import pytest

from mlops.evals.sequential import CONTINUE, NO_DIFFERENCE, WINNER_A, WINNER_B, Plan, Sequential, replay

ALPHA = 0.05


def stream(pa: float, pb: float, rng: random.Random, n: int) -> list[tuple[str, float]]:
    out = []
    for _ in range(n):
        arm = "B" if rng.random() < 0.5 else "A"
        out.append((arm, float(rng.random() < (pb if arm == "B" else pa))))
    return out


def naive_peeking_rejects(events: list[tuple[str, float]], min_n: int) -> bool:
    """A fixed-horizon two-proportion z-test read after every observation: what not to do."""
    n = {"A": 0, "B": 0}
    k = {"A": 0.0, "B": 0.0}
    for arm, x in events:
        n[arm] += 1
        k[arm] += x
        if min(n.values()) >= min_n:
            p = (k["A"] + k["B"]) / (n["A"] + n["B"])
            se = math.sqrt(p * (1 - p) * (1 / n["A"] + 1 / n["B"])) or 1.0
            if abs(k["B"] / n["B"] - k["A"] / n["A"]) / se > 1.96:
                return True
    return False


def test_continuous_monitoring_keeps_false_positives_at_alpha_where_peeking_does_not() -> None:
    plan = Plan(alpha=ALPHA, tau=0.05, min_samples=50, max_samples=600)
    rng = random.Random(7)
    runs = [stream(0.3, 0.3, rng, 1400) for _ in range(600)]
    msprt = sum(replay(ev, plan).decision in (WINNER_A, WINNER_B) for ev in runs) / len(runs)
    naive = sum(naive_peeking_rejects(ev, 50) for ev in runs) / len(runs)
    # 600 null experiments, each looked at after every one of ~1,100 observations: the binomial
    # spread of a 5% rate over 600 runs is 0.9 points, so 7% is 2.2 sigma above alpha
    assert msprt <= 0.07, msprt
    assert naive > 0.15, f"the repeated z-test should inflate the rate (got {naive:.3f}): the contrast is the point"


def test_a_planted_effect_is_found_in_its_direction_and_the_interval_covers_it() -> None:
    rng = random.Random(11)
    plan = Plan(alpha=ALPHA, tau=0.1, min_samples=50, max_samples=3000)
    found, covered = 0, 0
    for _ in range(60):
        r = replay(stream(0.30, 0.45, rng, 8000), plan)
        found += r.decision == WINNER_B
        assert r.decision != WINNER_A, r  # never the wrong way round at this effect
        covered += r.ci[0] <= 0.15 <= r.ci[1]
    assert found >= 55, found
    assert covered >= 55, covered  # an always-valid 95% interval, read at the stopping time


def test_lower_is_better_names_the_arm_with_the_smaller_mean() -> None:
    plan = Plan(alpha=ALPHA, tau=0.1, min_samples=40, max_samples=5000, higher_is_better=False)
    events = [("A", float(i % 5 == 0)) for i in range(400)] + [("B", 0.0) for _ in range(400)]
    events = [e for pair in zip(events[:400], events[400:], strict=True) for e in pair]  # interleaved
    r = replay(events, plan)
    assert r.decision == WINNER_B and r.effect < 0 and r.ci[1] < 0
    assert r.decided_at is not None and r.decided_at < 800


def test_no_look_before_min_samples_and_no_difference_at_max_samples() -> None:
    plan = Plan(alpha=ALPHA, tau=0.05, min_samples=30, max_samples=80)
    lopsided = [("A", 0.0)] * 29 + [("B", 1.0)] * 29  # a huge effect, but too few samples
    r = replay(lopsided, plan)
    assert r.decision == CONTINUE and r.looks == 0 and r.notes
    same = [(arm, float(i % 2)) for i in range(400) for arm in ("A", "B")]
    r = replay(same, plan)
    assert r.decision == NO_DIFFERENCE and r.n_a == r.n_b == 80 and r.ci[0] < 0 < r.ci[1]


def test_a_verdict_once_reached_stays_whatever_comes_after() -> None:
    plan = Plan(alpha=ALPHA, tau=0.1, min_samples=30, max_samples=5000)
    seq = Sequential(plan)
    for i in range(200):
        seq.add("A", float(i % 2))
        seq.add("B", 1.0)
    decided = seq.result()
    assert decided.decision == WINNER_B
    at, p = decided.decided_at, decided.p_value
    for _ in range(500):  # B turns bad afterwards: the decision was made at its stopping time
        seq.add("A", 1.0)
        seq.add("B", 0.0)
    again = seq.result()
    assert (again.decision, again.decided_at, again.p_value) == (WINNER_B, at, p)


def test_continuous_metric_uses_its_sample_variance() -> None:
    rng = random.Random(3)
    plan = Plan(alpha=ALPHA, tau=0.01, min_samples=30, max_samples=20_000, binary=False, higher_is_better=False)
    events = [(a, rng.gauss(0.050 if a == "A" else 0.060, 0.01)) for _ in range(3000) for a in ("A", "B")]
    r = replay(events, plan)
    assert r.decision == WINNER_A and r.ci[0] > 0  # B is 10 ms slower: A wins


@pytest.mark.parametrize(("kw", "msg"), [({"alpha": 1.5}, "alpha"), ({"tau": 0}, "tau"), ({"min_samples": 0}, "min")])
def test_a_plan_refuses_nonsense(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Plan(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("binary", [True, False])
def test_the_vectorised_replay_is_the_one_observation_at_a_time_test(binary: bool) -> None:
    """`replay` (numpy, what `mlops experiment status` and the benchmark run) and `Sequential`
    (one look per observation) agree on every seeded stream: decision, when, samples, p, interval."""
    rng = random.Random(5)
    for k in range(40):
        shift = (0.0, 0.04, 0.12)[k % 3]
        if binary:
            events = stream(0.4, 0.4 + shift, rng, 3000)
        else:
            events = [(a, rng.gauss(1.0 + (shift if a == "B" else 0.0), 0.3)) for a in rng.choices("AB", k=3000)]
        plan = Plan(alpha=ALPHA, tau=0.05, min_samples=40, max_samples=900, binary=binary)
        seq = Sequential(plan)
        for arm, x in events:
            seq.add(arm, x)
        one, fast = seq.result(), replay(events, plan)
        assert (fast.decision, fast.decided_at, fast.n_a, fast.n_b, fast.looks) == (
            one.decision,
            one.decided_at,
            one.n_a,
            one.n_b,
            one.looks,
        )
        assert fast.p_value == pytest.approx(one.p_value, rel=1e-6, abs=1e-12)
        assert fast.ci == pytest.approx(one.ci, rel=1e-6) and fast.effect == pytest.approx(one.effect)
