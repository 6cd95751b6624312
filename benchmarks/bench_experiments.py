"""The A/B test's false-positive rate and power over seeded simulated experiments (issue 19).

Each simulated experiment is a stream of users arriving one at a time, each assigned to arm B with
probability `share` and converting (a thumbs-up, a json_valid pass, an error) with its arm's rate;
the experiment is judged by `mlops.evals.sequential.replay_arrays` (what `mlops experiment status`
runs) after EVERY observation (the worst case for peeking) until a verdict or `max_samples` per arm. Printed per scenario:

    false-positive rate   share of null experiments (equal rates) that named a winner (goal <= alpha + 1 pt)
    power                 share of experiments at the planned effect that named the better arm
    samples               mean observations (both arms) when the experiment stopped
    fixed horizon         observations a one-look two-proportion z-test needs for 80% power, for scale
    naive peeking         the false-positive rate of that z-test read after every observation
    clustered users       users who send 5 requests each with rates of their own, judged per
                          request (observations not independent) and per user (`--unit user`)

    python benchmarks/bench_experiments.py [--runs 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlops.evals.sequential import WINNER_A, WINNER_B, Plan, replay_arrays  # noqa: E402

Z_HALF_ALPHA, Z_POWER = 1.959964, 0.841621  # alpha 0.05 two-sided, power 0.8


@dataclass(frozen=True)
class Scenario:
    name: str
    base: float  # arm A's rate
    effect: float  # the planned absolute effect (B - A); tau of the mixture
    share: float  # of users in arm B
    max_samples: int  # per arm
    min_samples: int = 100


SCENARIOS = [
    Scenario("conversion 20% +5 pt, 50/50", 0.20, 0.05, 0.5, 2000),
    Scenario("json_valid 90% -5 pt, 50/50", 0.90, -0.05, 0.5, 2000),
    Scenario("error rate 2% +2 pt, 50/50", 0.02, 0.02, 0.5, 3000),
    Scenario("conversion 20% +5 pt, 20/80", 0.20, 0.05, 0.2, 4000),
]


def simulate(sc: Scenario, rate_b: float, rng: np.random.Generator, naive: bool = False) -> tuple[str, int, bool]:
    """(decision, observations, whether a z-test read after every observation rejected). Each stream
    is as long as the experiment can run (max_samples per arm, with room for the smaller arm)."""
    plan = Plan(alpha=0.05, tau=abs(sc.effect), min_samples=sc.min_samples, max_samples=sc.max_samples)
    n = int(sc.max_samples / min(sc.share, 1 - sc.share) * 1.3)
    is_b = rng.random(n) < sc.share
    x = (rng.random(n) < np.where(is_b, rate_b, sc.base)).astype(float)
    r = replay_arrays(is_b, x, plan)
    return r.decision, r.n_a + r.n_b, naive and naive_rejects(is_b[: r.n_a + r.n_b], x, sc)


def naive_rejects(is_b: np.ndarray, x: np.ndarray, sc: Scenario) -> bool:
    """A one-look two-proportion z-test, read after every observation of the same stream."""
    x = x[: len(is_b)]
    nb = np.cumsum(is_b)
    na = np.arange(1, len(is_b) + 1) - nb
    kb, ka = np.cumsum(x * is_b), np.cumsum(x * ~is_b)
    ok = np.minimum(na, nb) >= sc.min_samples
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (ka + kb) / (na + nb)
        se = np.sqrt(p * (1 - p) * (1 / na + 1 / nb))
        z = np.abs(kb / nb - ka / na) / se
    return bool(np.any(ok & (se > 0) & (z > Z_HALF_ALPHA)))


def clustered(rng: np.random.Generator, k: int, per_user: bool, effect: float, max_samples: int) -> str:
    """A null (effect 0) or planted experiment whose users send `k` requests each, with rates that
    vary by user (Beta(1, 4): mean 20%, sd 16 pt); judged per request or per user (first request)."""
    plan = Plan(alpha=0.05, tau=0.05, min_samples=100, max_samples=max_samples)
    users = int(max_samples * 2 * 1.3 / (1 if per_user else k))
    b = rng.random(users) < 0.5
    rate = np.clip(rng.beta(1, 4, users) + np.where(b, effect, 0.0), 0, 1)
    if per_user:
        return replay_arrays(b, (rng.random(users) < rate).astype(float), plan).decision
    x = (rng.random((users, k)) < rate[:, None]).astype(float).ravel()  # a user's requests in a row
    return replay_arrays(np.repeat(b, k), x, plan).decision


def fixed_horizon(sc: Scenario) -> int:
    """Observations (both arms) of a one-look z-test with 80% power at the planned effect."""
    p1, p2 = sc.base, sc.base + sc.effect
    var = p1 * (1 - p1) / (1 - sc.share) + p2 * (1 - p2) / sc.share  # per observation, both arms
    return math.ceil((Z_HALF_ALPHA + Z_POWER) ** 2 * var / sc.effect**2)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000, help="null experiments per scenario (>= 1000 for the goal)")
    ap.add_argument("--power-runs", type=int, default=1000, help="experiments at the planned effect per scenario")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"mSPRT, alpha 0.05, a look after every observation; {args.runs} null / {args.power_runs} planned runs")
    print(
        "| scenario | max/arm | false positives (95% CI) | naive peeking | power | samples at effect | fixed horizon |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for i, sc in enumerate(SCENARIOS):
        rng = np.random.default_rng([args.seed, i])
        null = [simulate(sc, sc.base, rng, naive=True) for _ in range(args.runs)]
        fp = sum(d in (WINNER_A, WINNER_B) for d, _, _ in null)
        peek = sum(p for _, _, p in null) / args.runs
        want = WINNER_B if sc.effect > 0 else WINNER_A  # higher is better: the arm with the higher rate
        alt = [simulate(sc, sc.base + sc.effect, rng) for _ in range(args.power_runs)]
        power = sum(d == want for d, _, _ in alt) / args.power_runs
        samples = sum(n for _, n, _ in alt) / args.power_runs
        lo, hi = wilson(fp, args.runs)
        worst = max(worst, fp / args.runs)
        print(
            f"| {sc.name} | {sc.max_samples} | {fp / args.runs:.1%} ({lo:.1%}-{hi:.1%}) | {peek:.1%} "
            f"| {power:.0%} | {samples:,.0f} | {fixed_horizon(sc):,} |"
        )
    print()
    print("users who send 5 requests each, rates varying by user (mean 20%, sd 16 pt), +5 pt planted, max 2000/arm")
    print("| unit | false positives (95% CI) | power |")
    print("|---|---:|---:|")
    for j, per_user in enumerate((False, True)):
        rng = np.random.default_rng([args.seed, 100 + j])
        fp = sum(clustered(rng, 5, per_user, 0.0, 2000) in (WINNER_A, WINNER_B) for _ in range(args.runs))
        hits = sum(clustered(rng, 5, per_user, 0.05, 2000) == WINNER_B for _ in range(args.power_runs))
        lo, hi = wilson(fp, args.runs)
        unit = "user (first request)" if per_user else "request"
        print(f"| {unit} | {fp / args.runs:.1%} ({lo:.1%}-{hi:.1%}) | {hits / args.power_runs:.0%} |")
        if per_user:  # per request, these observations are not independent: that row shows why not
            worst = max(worst, fp / args.runs)
    verdict = "meets" if worst <= 0.06 else "MISSES"
    print(f"worst false-positive rate, independent observations: {worst:.1%}: {verdict} the goal (<= 6.0%)")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
