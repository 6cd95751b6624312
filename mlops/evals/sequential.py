"""A sequential A/B test that may be looked at after every observation: the mixture SPRT (mSPRT).

Johari, Koomen, Pekelis, Walsh, "Always valid inference: continuous monitoring of A/B tests"
(Operations Research, 2022). For the difference of two means θ = mean(B) - mean(A) with its normal
approximation θ̂ ~ N(θ, V), V = var(A)/n_A + var(B)/n_B, and a normal mixture θ ~ N(0, τ²) over
the alternatives, the likelihood ratio against θ = θ0 is

    Λ(θ0) = sqrt(V / (V + τ²)) · exp(τ² (θ̂ - θ0)² / (2 V (V + τ²)))

and 1/Λ is a p-value that stays valid whenever one stops (Ville's inequality on a martingale):
the running minimum p = min over looks of 1/Λ(0) is below α with probability at most α under
the null, however often one looks. The matching confidence sequence {θ0 : Λ(θ0) < 1/α} is
θ̂ ± sqrt(V (V + τ²) / τ² · (2 log(1/α) + log((V + τ²) / V))), intersected over the looks.

Why this one and not an alpha-spending boundary: an experiment on live traffic is read whenever
someone runs `mlops experiment status` (or a controller polls it), at no planned times and sample
sizes; O'Brien-Fleming needs the looks fixed in advance (or a spending function and an information
horizon), mSPRT needs neither and its p-value is the same whether read twice or ten thousand times.
The price is power: a planned fixed-horizon test needs fewer samples at the planned effect.

Binary metrics (an error, a thumbs-up, a json_valid pass) and continuous ones (latency) go through
the same statistic; variances are plug-in estimates, the binary one with one pseudo-success and one
pseudo-failure per arm (an arm with no errors yet still has a variance), and nothing is judged
before `min_samples` observations per arm (the normal approximation needs them).
`benchmarks/bench_experiments.py` measures the false-positive rate and the power.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

CONTINUE, WINNER_A, WINNER_B, NO_DIFFERENCE = "continue", "winner A", "winner B", "no difference"


@dataclass(frozen=True)
class Plan:
    """What an experiment is judged by. `tau`: the mixture's spread, on the metric's scale (the
    planned absolute effect is a good choice: the test is most powerful near it)."""

    alpha: float = 0.05
    tau: float = 0.05
    min_samples: int = 100  # per arm, before the first look
    max_samples: int = 10_000  # per arm: no verdict by then is "no difference"
    binary: bool = True
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be within (0, 1), got {self.alpha}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"need 1 <= min_samples ({self.min_samples}) <= max_samples ({self.max_samples})")


@dataclass
class Arm:
    """Running count, sum and sum of squares of one arm's observations."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.squares += x * x

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def variance(self, binary: bool) -> float:
        if binary:  # one pseudo-success and one pseudo-failure: never 0 while an arm is all-pass
            p = (self.total + 1) / (self.n + 2)
            return p * (1 - p)
        if self.n < 2:
            return 0.0
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


def log_lr(diff: float, v: float, tau2: float) -> float:
    """log Λ for an observed difference `diff` (θ̂ - θ0) with variance `v`."""
    return 0.5 * math.log(v / (v + tau2)) + tau2 * diff * diff / (2 * v * (v + tau2))


def half_width(v: float, tau2: float, alpha: float) -> float:
    """Half the width of the always-valid interval around θ̂."""
    return math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))


@dataclass
class Result:
    """Where an experiment stands. `effect` = mean(B) - mean(A) (B: the treatment); `relative`:
    effect / mean(A); `ci`: the always-valid interval of the effect; `p_value`: always valid."""

    decision: str = CONTINUE
    n_a: int = 0
    n_b: int = 0
    mean_a: float = 0.0
    mean_b: float = 0.0
    effect: float = 0.0
    relative: float | None = None
    ci: tuple[float, float] = (-math.inf, math.inf)
    p_value: float = 1.0
    looks: int = 0  # observations after the burn-in (each one a look)
    decided_at: int | None = None  # the observation (both arms counted) that decided
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = [None if not math.isfinite(x) else x for x in self.ci]
        return d


class Sequential:
    """Feed observations in arrival order (`add`); the verdict locks at the first crossing or at
    `max_samples` per arm, and later observations are not counted."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.a, self.b = Arm(), Arm()
        self.res = Result()
        self._tau2 = plan.tau * plan.tau
        self._crit = math.log(1 / plan.alpha)
        self._lo, self._hi = -math.inf, math.inf  # the running intersection of the intervals
        self._last = (-math.inf, math.inf)  # the last look's own interval

    @property
    def done(self) -> bool:
        return self.res.decision != CONTINUE

    def add(self, arm: str, x: float) -> None:
        if self.done:
            return
        (self.b if arm == "B" else self.a).add(float(x))
        self._look()

    def _look(self) -> None:
        p, a, b, r = self.plan, self.a, self.b, self.res
        if min(a.n, b.n) < p.min_samples:
            return
        v = a.variance(p.binary) / a.n + b.variance(p.binary) / b.n
        if v > 0:  # (a continuous metric with no spread in either arm: nothing to judge yet)
            r.looks += 1
            diff = b.mean - a.mean
            llr = log_lr(diff, v, self._tau2)
            r.p_value = min(r.p_value, math.exp(-max(0.0, llr)))
            hw = half_width(v, self._tau2, p.alpha)
            self._lo, self._hi = max(self._lo, diff - hw), min(self._hi, diff + hw)
            self._last = (diff - hw, diff + hw)
            if llr >= self._crit:
                r.decision = WINNER_B if (diff > 0) == p.higher_is_better else WINNER_A
        if r.decision == CONTINUE and min(a.n, b.n) >= p.max_samples:
            r.decision = NO_DIFFERENCE
        if r.decision != CONTINUE:
            r.decided_at = a.n + b.n

    def result(self) -> Result:
        r, a, b = self.res, self.a, self.b
        r.n_a, r.n_b, r.mean_a, r.mean_b = a.n, b.n, a.mean, b.mean
        r.effect = b.mean - a.mean
        r.relative = r.effect / a.mean if a.mean else None
        # an intersection that emptied (by chance, as a 95% interval may miss) gives the last interval
        r.ci = (self._lo, self._hi) if self._lo <= self._hi else self._last
        if min(a.n, b.n) < self.plan.min_samples:
            r.notes = [f"{min(a.n, b.n)} of the {self.plan.min_samples} observations per arm needed before a look"]
        else:
            r.notes = []
        return r


def replay(events: Iterable[tuple[str, float]], plan: Plan) -> Result:
    """The verdict on a stream of ("A"|"B", value) in arrival order: the same answer whenever it is
    read, since every earlier look is replayed (a p-value's running minimum needs them all).
    Vectorised (numpy): what `Sequential` computes one observation at a time, at once."""
    import numpy as np

    pairs = list(events)
    is_b = np.fromiter((arm == "B" for arm, _ in pairs), dtype=bool, count=len(pairs))
    x = np.fromiter((v for _, v in pairs), dtype=float, count=len(pairs))
    return replay_arrays(is_b, x, plan)


def replay_arrays(is_b: Any, x: Any, plan: Plan) -> Result:
    """`replay` on two numpy arrays: which observation went to B, and its value."""
    import numpy as np

    is_b = np.asarray(is_b, dtype=bool)
    x = np.asarray(x, dtype=float)
    seq = Sequential(plan)  # for the result's bookkeeping; the looks are computed here
    if len(x) == 0:
        return seq.result()
    nb = np.cumsum(is_b)
    na = np.arange(1, len(x) + 1) - nb
    xb, xa = np.where(is_b, x, 0.0), np.where(is_b, 0.0, x)
    sb, sa = np.cumsum(xb), np.cumsum(xa)
    qb, qa = np.cumsum(xb * xb), np.cumsum(xa * xa)
    ready = np.minimum(na, nb) >= plan.min_samples
    with np.errstate(divide="ignore", invalid="ignore"):
        ma, mb = sa / na, sb / nb
        if plan.binary:
            pa, pb = (sa + 1) / (na + 2), (sb + 1) / (nb + 2)
            v = pa * (1 - pa) / na + pb * (1 - pb) / nb
        else:
            va = np.maximum(0.0, (qa - sa * sa / na) / (na - 1))
            vb = np.maximum(0.0, (qb - sb * sb / nb) / (nb - 1))
            v = va / na + vb / nb
        look = ready & (v > 0)
        tau2 = plan.tau * plan.tau
        diff = mb - ma
        llr = np.where(look, 0.5 * np.log(v / (v + tau2)) + tau2 * diff * diff / (2 * v * (v + tau2)), -np.inf)
        hw = np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / plan.alpha) + np.log((v + tau2) / v)))
    crossed = llr >= math.log(1 / plan.alpha)
    maxed = ready & (np.minimum(na, nb) >= plan.max_samples)
    stops = np.flatnonzero(crossed | maxed)
    end = int(stops[0]) + 1 if len(stops) else len(x)  # observations counted
    r = seq.res
    lk = np.flatnonzero(look[:end])
    r.looks = len(lk)
    if len(lk):
        r.p_value = float(min(1.0, np.exp(-np.maximum(0.0, llr[lk])).min()))
        lo, hi = float((diff[lk] - hw[lk]).max()), float((diff[lk] + hw[lk]).min())
        last = int(lk[-1])
        seq._lo, seq._hi = lo, hi
        seq._last = (float(diff[last] - hw[last]), float(diff[last] + hw[last]))
    if len(stops):
        i = int(stops[0])
        if crossed[i]:
            r.decision = WINNER_B if (diff[i] > 0) == plan.higher_is_better else WINNER_A
        else:
            r.decision = NO_DIFFERENCE
        r.decided_at = end
    n_b = int(nb[end - 1])
    seq.a = Arm(end - n_b, float(sa[end - 1]), float(qa[end - 1]))
    seq.b = Arm(n_b, float(sb[end - 1]), float(qb[end - 1]))
    return seq.result()
