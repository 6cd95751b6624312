"""Live analysis of a rollout step: the candidate against production on the same window of real
requests, and the SLOs a promoted release is held to (issue 19).

The window is read from what every serving path writes to the registry's store (the capture
records of mlops/monitor/capture.py: release, status, latency, texts), never from one container's
memory; mlops's own requests (evals, replay, smoke) carry the not-captured header and are absent
from it. The gateway's shared counters (`/v1/mlops/stats`) may be passed beside it: they count every
request, mlops's own included, and are kept as context (how much of the traffic capture saw).

A step runs k one-sided tests, each at alpha/k (Bonferroni: the chance that a step fails a
candidate as good as production is at most alpha):

- errors: a two-proportion z-test on 5xx/429 answers, and an exact binomial test of the
  candidate's rate against the absolute `rollout.max_error_rate`, each at half the errors' share;
- latency: fails when the candidate's p95 is over `max_p95_ratio` x production's AND the slowdown is
  significant, by a Mann-Whitney rank test (the whole distribution) or a tail test (the share above
  the pooled p95), each at half the latency share of alpha;
- each judged suite metric on sampled live answers: a two-proportion test for a 0/1 metric
  (json_valid, regex), Mann-Whitney for the others (length), in the metric's worse direction.

A check may pass only with its minimum number of requests (or scored answers) on both sides; with
fewer it may still fail (a significant difference is one already). A step with a check short of
traffic is extended (`extend`) up to `max_extensions` times, then fails or asks for a replay
(`replay`: judge it on replayed eval prompts, pinned to each release; see `replay_window`).

How a controller uses it, per rollout (the store is the registry's; `counters` optional):

    reader = WindowReader(registry, candidate, production)       # parses each capture file once
    w = reader.read(step_started_at, now, counters)
    v = judge_step(w, cfg, live_metrics(loaded), extensions=n, step=i + 1, percent=pct,
                   baseline=reader.read(prev_since, prev_until).production)  # at 100%
    # v.decision: pass -> next step | fail -> roll back | extend -> bake again, n + 1 |
    # replay -> judge_step(replay_window(url, prompts, candidate, production,
    #                                    cfg.analysis.replay_requests, ...), cfg, ...)
    # after promotion, every interval, with production's side of its last canary window:
    # slo_verdict(reader.read(since, now), cfg.guardrails, baseline=last_production_side)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mlops.config import RolloutCfg
from mlops.configrollout import GuardrailsCfg
from mlops.contracts import StepVerdict
from mlops.monitor.compare import TestResult, above, binomial_above, mann_whitney, two_proportion_z
from mlops.monitor.live import LiveWindow, Side, WindowReader, read_window, replay_window

if TYPE_CHECKING:
    from mlops.config import Loaded
    from mlops.evals.types import Metric

LATENCY_SLACK_S = 0.005  # differences below 5 ms are scheduling noise, not a regression (as rollout.py)
MIN_FAIL_SAMPLES = 8  # below this a test's p-value is too coarse to fail on, whatever min_requests says
DECIDED_BY = "controller:analysis"
__all__ = [
    "LiveWindow",
    "Side",
    "WindowReader",
    "check_slo",
    "judge_step",
    "live_metrics",
    "read_window",
    "replay_window",
    "slo_verdict",
]
Decision = Literal["pass", "fail", "extend", "replay"]


@dataclass
class _Check:
    name: str
    status: Literal["pass", "fail", "insufficient"]
    why: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "why": self.why, **self.numbers}


def _pct(r: float) -> str:
    return f"{r:.1%}"


def _errors(c: Side, p: Side, cfg: RolloutCfg, a: float) -> _Check:
    """Two tests at a/2 each: more errors than production, and a rate over the absolute ceiling."""
    n = cfg.analysis.min_requests
    t = two_proportion_z(c.errors, c.requests, p.errors, p.requests)
    ceiling = binomial_above(c.errors, c.requests, cfg.max_error_rate)
    nums = {
        "z": round(t.statistic, 4),
        "p_value": round(t.p_value, 6),
        "ceiling_p_value": round(ceiling.p_value, 6),
        "alpha": a,
    }
    what = (
        f"error rate {_pct(c.error_rate)} ({c.errors}/{c.requests}) "
        f"vs production {_pct(p.error_rate)} ({p.errors}/{p.requests})"
    )
    if t.p_value < a / 2 and t.effect > 0 and min(c.requests, p.requests) >= MIN_FAIL_SAMPLES:
        return _Check("error_rate", "fail", f"{what}: p={t.p_value:.4f} < {a / 2:.4g}", nums)
    if ceiling.p_value < a / 2 and c.requests >= MIN_FAIL_SAMPLES:
        why = f"{what}: over max_error_rate {_pct(cfg.max_error_rate)}, p={ceiling.p_value:.4f} < {a / 2:.4g}"
        return _Check("error_rate", "fail", why, nums)
    if c.requests < n or p.requests < n:
        why = f"{c.requests} candidate / {p.requests} production requests < {n}"
        return _Check("error_rate", "insufficient", why, nums)
    return _Check("error_rate", "pass", f"{what}: p={t.p_value:.4f}", nums)


def _latency(c: Side, p: Side, cfg: RolloutCfg, a: float) -> _Check:
    n = cfg.analysis.min_requests
    p95c, p95p = c.p(0.95), p.p(0.95)
    ratio = p95c / p95p if p95p > 0 else 1.0
    rank = mann_whitney(c.latencies, p.latencies)
    tail = above(c.latencies, p.latencies)
    nums = {
        "p95_ratio": round(ratio, 4),
        "rank_p_value": round(rank.p_value, 6),
        "tail_p_value": round(tail.p_value, 6),
        "alpha": a,
    }
    what = f"p95 {p95c * 1000:.1f} ms vs production {p95p * 1000:.1f} ms (x{ratio:.2f})"
    slower = ratio > cfg.max_p95_ratio and p95c - p95p > LATENCY_SLACK_S
    significant = min(rank.p_value, tail.p_value) < a / 2
    if slower and significant and min(len(c.latencies), len(p.latencies)) >= MIN_FAIL_SAMPLES:
        return _Check(
            "latency",
            "fail",
            f"{what} > x{cfg.max_p95_ratio:g}, rank p={rank.p_value:.4f}, tail p={tail.p_value:.4f} < {a / 2:.4g}",
            nums,
        )
    if len(c.latencies) < n or len(p.latencies) < n:
        return _Check(
            "latency",
            "insufficient",
            f"{len(c.latencies)} candidate / {len(p.latencies)} production answers < {n}",
            nums,
        )
    return _Check("latency", "pass", what, nums)


def _sample(side: Side, k: int, nonempty: bool = False) -> list[dict[str, Any]]:
    """Up to `k` answers with their text, seeded (a rerun judges the same answers). A judge is shown
    non-empty ones only: it cannot rate nothing (deepeval refuses), and how often a release answers
    nothing is `empty_rate`'s business. Drawn by index first: a window may hold 100k answers."""
    rng = random.Random(0)
    if len(side.answers) > 4 * k:
        picks = [side.answers[i] for i in rng.sample(range(len(side.answers)), 4 * k)]
        pool = [r for r in picks if isinstance(r.get("output"), str) and (r["output"] or not nonempty)]
        if len(pool) >= k:
            return pool[:k]
    pool = side.texts(nonempty)
    return rng.sample(pool, min(k, len(pool)))


def _scores(m: Metric, recs: list[dict[str, Any]]) -> tuple[list[float], int]:
    """(scored values, answers the metric could not score: a judge that timed out fails no release)."""
    from mlops.evals.harness import score
    from mlops.evals.types import Case, Output

    if not recs:
        return [], 0
    cases = [Case(str(r["id"]), str(r.get("prompt") or "")) for r in recs]
    outs = [Output(str(r["output"]), float(r.get("latency_s") or 0.0)) for r in recs]
    _, rows = score([m], cases, outs)
    vals = [row.scores[m.name] for row in rows if m.name not in row.failed]
    return vals, len(rows) - len(vals)


def _metric(m: Metric, c: Side, p: Side, cfg: RolloutCfg, a: float, judge: bool) -> _Check:
    an = cfg.analysis
    k = an.judge_sample if judge else an.sample
    need = min(an.min_samples, k)
    vc, fc = _scores(m, _sample(c, k, judge))
    vp, fp = _scores(m, _sample(p, k, judge))
    name = f"metric.{m.name}"
    mc = sum(vc) / len(vc) if vc else 0.0
    mp = sum(vp) / len(vp) if vp else 0.0
    worse = (mp - mc) if m.higher_is_better else (mc - mp)
    binary = all(v in (0.0, 1.0) for v in [*vc, *vp])
    t: TestResult
    if binary:  # 0/1 scores: the share of bad answers, as the error rate
        bad = (lambda v: v == 0.0) if m.higher_is_better else (lambda v: v == 1.0)
        t = two_proportion_z(sum(map(bad, vc)), len(vc), sum(map(bad, vp)), len(vp))
    else:
        t = mann_whitney(vp, vc) if m.higher_is_better else mann_whitney(vc, vp)
    nums = {
        "candidate": round(mc, 6),
        "production": round(mp, 6),
        "n": [len(vc), len(vp)],
        "p_value": round(t.p_value, 6),
    }
    if fc or fp:
        nums["unscored"] = [fc, fp]
    nums["alpha"] = a
    what = f"{m.name} {mc:.4g} vs production {mp:.4g} ({len(vc)}/{len(vp)} answers)"
    drop = an.max_metric_drop.get(m.name, 0.0)
    if t.p_value < a and worse > drop and min(len(vc), len(vp)) >= MIN_FAIL_SAMPLES:
        return _Check(name, "fail", f"{what}: worse by {worse:.4g} > {drop:g}, p={t.p_value:.4f} < {a:.4g}", nums)
    if len(vc) < need or len(vp) < need:
        return _Check(name, "insufficient", f"{len(vc)} candidate / {len(vp)} production scored answers < {need}", nums)
    return _Check(name, "pass", f"{what}: p={t.p_value:.4f}", nums)


def judge_step(
    window: LiveWindow,
    cfg: RolloutCfg,
    metrics: Sequence[Metric] = (),
    *,
    extensions: int = 0,
    step: int = 0,
    percent: int = 0,
    baseline: Side | None = None,
    judge_metrics: Sequence[str] = (),
) -> StepVerdict:
    """Judge one step. `metrics`: the live metrics (`live_metrics(loaded)`); `extensions`: how often
    this step was extended already; `baseline`: production's side from an earlier window, used when
    production has too few requests in this one (at 100% it has none); `judge_metrics`: the names
    among `metrics` that ask a judge (scored on `judge_sample` answers; default: plugins' list)."""
    from mlops.plugins import JUDGE_METRICS

    an = cfg.analysis
    c, p = window.candidate, window.production
    notes: list[str] = []
    if baseline is not None and p.requests < an.min_requests:
        p = baseline
        notes.append(f"production compared on an earlier window ({baseline.requests} requests)")
    a = an.alpha / (2 + len(metrics))
    judged = set(judge_metrics) or set(JUDGE_METRICS)
    checks = [_errors(c, p, cfg, a), _latency(c, p, cfg, a)]
    checks += [_metric(m, c, p, cfg, a, m.name in judged) for m in metrics]
    failed = [ch for ch in checks if ch.status == "fail"]
    short = [ch for ch in checks if ch.status == "insufficient"]
    decision: Decision
    reasons = [f"{ch.name}: {ch.why}" for ch in failed]
    if failed:
        decision = "fail"
    elif not short:
        decision = "pass"
    elif window.source == "live" and extensions < an.max_extensions:
        decision = "extend"
        reasons = [
            f"too little traffic ({extensions + 1}/{an.max_extensions} extensions): {ch.name}: {ch.why}" for ch in short
        ]
    elif window.source == "live" and an.on_insufficient_traffic == "replay":
        decision = "replay"
        reasons = [
            f"too little live traffic after {extensions} extensions, replaying eval prompts: {ch.name}: {ch.why}"
            for ch in short
        ]
    else:
        decision = "fail"
        where = "replayed traffic" if window.source == "replay" else f"live traffic after {extensions} extensions"
        reasons = [f"too little {where}: {ch.name}: {ch.why}" for ch in short]
    if window.counters:
        seen = {
            r: int(window.counters.get(s.release, {}).get("requests", 0))
            for r, s in (("candidate", c), ("production", p))
        }
        notes.append(f"served (mlops's own included): {seen['candidate']} candidate, {seen['production']} production")
    return StepVerdict(
        step=step,
        percent=percent,
        candidate=c.summary(),
        production=p.summary(),
        passed=decision == "pass",
        reasons=reasons,
        decided_by=DECIDED_BY,
        mode="replay" if window.source == "replay" else "canary",
        notes=notes,
        decision=decision,
        checks=[ch.doc() for ch in checks],
    )


def live_metrics(loaded: Loaded) -> list[Metric]:
    """The suite metrics `deploy.rollout.analysis` judges on live answers, built (judge metrics with
    their judge client; a suite's ragas/deepeval metrics that are not named are never imported)."""
    from mlops.config import metric_name
    from mlops.configrollout import REFERENCE_FREE
    from mlops.evals.harness import metric_specs
    from mlops.evals.metrics import build_metric

    an = loaded.cfg.deploy.rollout.analysis
    suite = an.suite or next(iter(loaded.cfg.evals), None)
    if suite is None:
        return []
    specs = metric_specs(loaded, suite)
    names = set(an.metrics) if an.metrics is not None else set(REFERENCE_FREE)
    chosen = [sp for sp in specs if metric_name(sp) in names]
    clients: dict[str, Any] = {}
    if loaded.cfg.judges and any(isinstance(sp, dict) and sp.get("judge") for sp in chosen):
        from mlops.evals.judges import JudgeClient

        clients = {name: JudgeClient(j, None, name=name) for name, j in loaded.cfg.judges.items()}
    return [build_metric(sp, loaded.root, clients) for sp in chosen]


def check_slo(
    window: LiveWindow, cfg: GuardrailsCfg, baseline_p95: float | None = None, baseline: Side | None = None
) -> list[str]:
    """The SLOs `window.candidate` (the release under watch) breaches; [] when none, or when it had
    fewer than `min_requests` requests (nothing judged). The p95 ratio and the PSIs compare with
    `window.production` (the previous production), or with `baseline` (its side of its last canary
    window) when that has too few answers, as after promotion; the ratio falls back on
    `baseline_p95` (seconds) when neither has enough."""
    from mlops.monitor import stats

    c, p = window.candidate, window.production
    if baseline is not None and len(p.answers) < cfg.min_requests:
        p = baseline
    if c.requests < cfg.min_requests:
        return []
    out = []
    if cfg.max_error_rate is not None and c.error_rate > cfg.max_error_rate:
        out.append(f"error rate {_pct(c.error_rate)} ({c.errors}/{c.requests}) > {_pct(cfg.max_error_rate)}")
    p95 = c.p(0.95)
    if cfg.max_p95_ms is not None and p95 * 1000 > cfg.max_p95_ms:
        out.append(f"p95 {p95 * 1000:.1f} ms > {cfg.max_p95_ms:g} ms")
    base = p.p(0.95) if len(p.latencies) >= cfg.min_requests else baseline_p95
    if cfg.max_p95_ratio is not None and base and p95 > cfg.max_p95_ratio * base and p95 - base > LATENCY_SLACK_S:
        out.append(f"p95 {p95 * 1000:.1f} ms > {cfg.max_p95_ratio:g} x previous {base * 1000:.1f} ms")
    answers = c.answers
    values: dict[str, float | None] = {}
    if answers:
        values["empty_rate"] = sum(1 for r in answers if not r.get("output_len")) / len(answers)
        values["truncated_rate"] = sum(1 for r in answers if r.get("finish_reason") == "length") / len(answers)
        tokens = [(r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0) for r in answers]
        values["tokens_per_request"] = sum(tokens) / len(tokens)
    ref = p.answers if len(p.answers) >= cfg.min_requests else []
    for key, stat in (("output_len", "output_length_psi"), ("prompt_len", "prompt_length_psi")):
        a = [float(r[key]) for r in ref if isinstance(r.get(key), int)]
        b = [float(r[key]) for r in answers if isinstance(r.get(key), int)]
        values[stat] = stats.psi(a, b) if a and b else None
    for stat, limit in cfg.monitor.items():
        v = values.get(stat)
        if v is not None and v > limit:
            out.append(f"{stat} {v:.4g} > {limit:g}")
    return out


def slo_verdict(
    window: LiveWindow, cfg: GuardrailsCfg, baseline_p95: float | None = None, baseline: Side | None = None
) -> StepVerdict:
    """`check_slo` as the verdict a guardrail check records: fail with the breaches as reasons;
    `extend` while the window holds fewer than `min_requests` requests (nothing judged yet)."""
    breaches = check_slo(window, cfg, baseline_p95, baseline)
    c = window.candidate
    decision: Decision = "fail" if breaches else "extend" if c.requests < cfg.min_requests else "pass"
    notes = [f"{c.requests} requests < guardrails.min_requests {cfg.min_requests}"] if decision == "extend" else []
    return StepVerdict(
        step=0,
        percent=100,
        candidate=c.summary(),
        production=(baseline if baseline is not None else window.production).summary(),
        passed=decision == "pass",
        reasons=breaches,
        decided_by="controller:guardrail",
        mode="guardrail",
        notes=notes,
        decision=decision,
    )
