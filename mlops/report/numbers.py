"""The report's numbers: a release against its baseline, from stored results only (no model is called).

`build_report` returns a `model.Report`: its `model_dump()` is what `mlops report --json` prints,
and `mlops.report.markdown` renders it.
"""

from __future__ import annotations

from typing import Any

from mlops.config import Config, GateCfg
from mlops.contracts import CaseRow, EvalResult, GateResult
from mlops.evals.gates import Sample, check_gates, segment_tags
from mlops.registry import costs
from mlops.registry.releases import Registry
from mlops.report.model import (
    MetricRow,
    NewCase,
    NewCases,
    Report,
    ReportCost,
    SegmentRow,
    SuiteInfo,
    TrendPoint,
    TrendSeries,
    WorstCase,
    WorstCases,
)
from mlops.report.noise import build_noise, exclusions

WORST_CASES = 8  # per suite
MAX_WORST = 12  # in all
MAX_NEW = 20  # new cases listed (the total is always given)
TREND_RELEASES = 10
JSON_TEXT = 2_000  # characters of case text kept in the JSON report
STATUS_EVENTS = ("promoted", "rejected", "rolled_back", "gates_passed", "gates_failed", "evaluated")


def build_report(reg: Registry, cfg: Config, release: str, production: Registry | None = None) -> Report:
    """Everything the report shows, for `release` against production (or, for production itself,
    against the previous release). `production`: the registry production lives in when it is not
    `reg` (a pull request's own registry), read only."""
    prod_reg = production or reg
    manifest = reg.require(release)
    history = reg.history(release)
    st, _ = prod_reg.read_state()
    prod = st.stages.get("production")
    baseline: str | None
    baseline_stage: str | None
    if prod and prod != release:
        baseline, baseline_stage = prod, "production"
    elif prod == release and st.stages.get("previous"):
        baseline, baseline_stage = st.stages.get("previous"), "previous"
    else:
        baseline, baseline_stage = None, None
    cand = {suite: reg.get_eval(release, suite) for suite in cfg.evals}
    base = {suite: prod_reg.get_eval(baseline, suite) if baseline else None for suite in cfg.evals}
    evaluated = {k: v for k, v in cand.items() if v is not None}
    quarantine, flaky = exclusions(reg, cfg, evaluated)
    gates = check_gates(cfg.gates, evaluated, base, quarantine, flaky) if evaluated else []
    if not evaluated:
        verdict = "not evaluated"
    elif not gates:
        verdict = "not gated"
    else:
        verdict = "pass" if all(g.passed for g in gates) else "fail"
    rows = _rows(evaluated, base, gates)
    return Report(
        release=release,
        model=manifest.get("model"),
        baseline=baseline,
        baseline_stage=baseline_stage,
        production=prod,
        status=next((h["event"] for h in reversed(history) if h["event"] in STATUS_EVENTS), "registered"),
        verdict=verdict,
        gates=gates,
        metrics=rows,
        worst_cases=_worst_cases(evaluated, base, gates),
        trend=_trend(reg, release, cfg.gates, rows),
        cost=_cost(manifest, evaluated),
        suites={k: SuiteInfo(n=v.n, created_at=v.created_at) for k, v in evaluated.items()},
        lineage=manifest.get("lineage", {}),
        segments=_segment_rows(evaluated, base, gates),
        noise=build_noise(reg, cfg, evaluated, base, prod_reg),
        new_cases=_new_cases(evaluated, base, gates) if baseline else None,
        budget=costs.document(cfg, reg.store, {}, [], release) if cfg.budget.active else None,
    )


def stat_key(stat: str, threshold: float | None) -> str:
    return f"pass_rate@{threshold:g}" if stat == "pass_rate" and threshold is not None else stat


def _rows(
    evaluated: dict[str, EvalResult], base: dict[str, EvalResult | None], gates: list[GateResult]
) -> list[MetricRow]:
    return [
        MetricRow(**row)
        for suite, res in evaluated.items()
        for metric in res.metrics
        for row in _stat_rows(suite, metric, res, base.get(suite), gates, None)
    ]


def _segment_rows(
    evaluated: dict[str, EvalResult], base: dict[str, EvalResult | None], gates: list[GateResult]
) -> list[SegmentRow]:
    """metric x segment, for every suite whose cases carry tags: the same numbers as the overall rows,
    over each tag's cases (the baseline paired by case id, as the segment gates pair them)."""
    return [
        SegmentRow(**row, segment=tag)
        for suite, res in evaluated.items()
        for tag in sorted(segment_tags(res))
        for metric in res.metrics
        for row in _stat_rows(suite, metric, res, base.get(suite), gates, tag)
    ]


def _stat_rows(
    suite: str,
    metric: str,
    res: EvalResult,
    b_res: EvalResult | None,
    gates: list[GateResult],
    segment: str | None,
) -> list[dict[str, Any]]:
    """One row's fields per gated statistic of `metric` (or its mean), over `segment`'s cases or all."""
    rows: list[dict[str, Any]] = []
    summ = res.metrics[metric]
    mine = [g for g in gates if g.eval == suite and g.metric == metric and g.segment == segment]
    stats = list(dict.fromkeys((g.stat, g.stat_threshold) for g in mine)) or [("mean", None)]
    c = Sample.of(res, metric, segment)
    b = Sample.of(b_res, metric) if b_res is not None else None
    if c is None or (segment is not None and not c.values):
        return rows
    ids = list(c.values) if b is None else [i for i in c.values if i in b.values]
    for stat, thr in stats:
        cval = c.stat(stat, thr)
        if segment is None:
            bval = b.stat(stat, thr) if b is not None else None
        else:  # the baseline's same cases, whether or not its stored rows have tags
            bval = b.stat(stat, thr, ids) if b is not None and ids else None
        these = [g for g in mine if (g.stat, g.stat_threshold) == (stat, thr)]
        reg = next((g for g in these if g.kind == "regression" and g.interval), None)
        n = summ.n if segment is None else len(c.values)
        failed = summ.failed if segment is None else sum(c.failed.values())
        rows.append(
            {
                "suite": suite,
                "metric": metric,
                "stat": stat,
                "stat_threshold": thr,
                "higher_is_better": summ.higher_is_better,
                "production": bval,
                "candidate": cval,
                "delta": None if bval is None else cval - bval,
                "interval": reg.interval if reg else None,
                "paired_cases": reg.n if reg else None,
                "threshold": "; ".join(g.threshold for g in these),
                "verdict": ("pass" if all(g.passed for g in these) else "fail") if these else None,
                "failed_cases": failed,
                "n": n,
            }
        )
    return rows


def _primary_metric(suite: str, res: EvalResult, gates: list[GateResult]) -> str | None:
    mine = [g for g in gates if g.eval == suite and g.metric in res.metrics]
    for g in sorted(mine, key=lambda g: g.kind != "regression"):
        return g.metric
    return next((m for m, v in res.metrics.items() if v.higher_is_better), next(iter(res.metrics), None))


def _cut(text: str, limit: int = JSON_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip(text: str | None) -> str | None:
    return None if text is None else _cut(text)


def _worst_cases(
    evaluated: dict[str, EvalResult], base: dict[str, EvalResult | None], gates: list[GateResult]
) -> WorstCases:
    """The cases that lost most against the baseline on each suite's primary metric (its first
    regression-gated metric), or, with no baseline, the lowest-scoring cases."""
    picked: list[WorstCase] = []
    compared = any(base.get(s) for s in evaluated)
    for suite, res in evaluated.items():
        metric = _primary_metric(suite, res, gates)
        if metric is None:
            continue
        better = 1.0 if res.metrics[metric].higher_is_better else -1.0
        b_res = base.get(suite)
        prev = {c.id: c for c in (b_res.cases if b_res is not None else [])}
        scored = [c for c in res.cases if metric in c.scores]
        best = max((better * c.scores[metric] for c in scored), default=0.0)
        ranked: list[tuple[float, CaseRow, CaseRow | None]] = []
        for c in scored:
            value = c.scores[metric]
            failed = metric in c.failed
            p = prev.get(c.id)
            if prev:  # against the baseline: what got worse, or newly failed
                if p is None or metric not in p.scores:
                    continue
                loss = better * (p.scores[metric] - value)
                if loss <= 0 and not (failed and metric not in p.failed):
                    continue
            else:  # no baseline: the lowest-scoring cases (not those at the suite's best)
                loss = best - better * value
                if loss <= 0 and not failed:
                    continue
            ranked.append((loss, c, p))
        ranked.sort(key=lambda t: (-t[0], t[1].id))
        for loss, c, p in ranked[:WORST_CASES]:
            error = c.error
            if error is None and metric in c.failed:
                error = c.reasons.get(metric)
            picked.append(
                WorstCase(
                    suite=suite,
                    metric=metric,
                    id=c.id,
                    loss=loss,
                    input=_cut(c.input),
                    expected=_clip(c.expected),
                    candidate=_cut(c.output),
                    candidate_score=c.scores[metric],
                    candidate_error=_clip(error),
                    production=_clip(p.output) if p else None,
                    production_score=p.scores.get(metric) if p else None,
                )
            )
    picked.sort(key=lambda r: -r.loss)
    return WorstCases(compared=compared, cases=picked[:MAX_WORST])


def _new_cases(
    evaluated: dict[str, EvalResult], base: dict[str, EvalResult | None], gates: list[GateResult]
) -> NewCases:
    """Cases whose id the baseline's results of the same suite lack (a suite the baseline never ran:
    all of its cases), with the candidate's score on the suite's primary metric."""
    picked: list[NewCase] = []
    for suite, res in evaluated.items():
        b = base.get(suite)
        known = {c.id for c in b.cases} if b is not None else set()
        metric = _primary_metric(suite, res, gates)
        for c in res.cases:
            if c.id in known:
                continue
            score = c.scores.get(metric) if metric else None
            picked.append(
                NewCase(suite=suite, id=c.id, input=_cut(c.input), expected=_clip(c.expected),
                        candidate=_cut(c.output), metric=metric, score=score, tags=c.tags)
            )  # fmt: skip
    return NewCases(total=len(picked), cases=picked[:MAX_NEW])


def _event_value(history: list[dict[str, Any]], key: tuple[str, str, str, float | None]) -> float | None:
    suite, metric, stat, thr = key
    for h in reversed(history):
        d = h.get("detail") or {}
        if h["event"] in ("gates_passed", "gates_failed"):
            for g in d.get("gates", []):
                if g.get("segment") is not None:
                    continue
                if (g.get("eval"), g.get("metric"), g.get("stat"), g.get("stat_threshold")) == key:
                    if g.get("candidate") is not None:
                        return float(g["candidate"])
        if h["event"] == "evaluated" and stat != "pass_rate":
            v = (d.get("stats") or {}).get(suite, {}).get(metric, {}).get(stat)
            if v is None and stat == "mean":
                v = (d.get("summary") or {}).get(suite, {}).get(metric)
            if v is not None:
                return float(v)
    return None


def _trend(reg: Registry, release: str, gates_cfg: list[GateCfg], rows: list[MetricRow]) -> list[TrendSeries]:
    """Each gated statistic over the last releases up to this one, oldest first, from history
    events (small), never from result files (which can be large)."""
    ids = [m["id"] for m in reg.list()]  # newest first, from the index
    start = ids.index(release) if release in ids else 0
    # only the charted releases' histories are read, not every release's
    window = [{"id": rid, "history": reg.history(rid)} for rid in reversed(ids[start : start + TREND_RELEASES])]
    st, _ = reg.read_state()
    prod = st.stages.get("production")
    out = []
    keys = list(dict.fromkeys((g.eval, g.metric, g.stat, g.threshold) for g in gates_cfg if g.segment is None))
    for key in keys:
        suite, metric, stat, thr = key
        now = next((r.candidate for r in rows if (r.suite, r.metric, r.stat, r.stat_threshold) == key), None)
        points = []
        for m in window:
            v = now if m["id"] == release else _event_value(m.get("history", []), key)
            if v is not None:
                points.append(TrendPoint(release=m["id"], value=v, production=m["id"] == prod, this=m["id"] == release))
        bounds = [
            b
            for g in gates_cfg
            if (g.eval, g.metric, g.stat, g.threshold) == key and g.segment is None
            for b in (g.min, g.max)
            if b is not None
        ]
        out.append(
            TrendSeries(
                suite=suite,
                metric=metric,
                stat=stat,
                stat_threshold=thr,
                label=f"{suite}.{metric} {stat_key(stat, thr)}",
                points=points,
                bounds=bounds,
            )
        )
    return out


def _cost(manifest: dict[str, Any], evaluated: dict[str, EvalResult]) -> ReportCost:
    train = manifest.get("train") or {}
    seconds = train.get("seconds")
    device = str(train.get("device") or "")
    on_gpu = any(k in device.lower() for k in ("cuda", "gpu"))

    def total(key: str) -> int:
        return int(sum(getattr(r.cost, key) for r in evaluated.values()))

    return ReportCost(
        train_seconds=seconds,
        train_device=device or None,
        gpu_seconds=train.get("gpu_seconds", (seconds or 0.0) if on_gpu else 0.0),
        train_tokens=train.get("tokens") or int((train.get("tokens_per_s") or 0) * (seconds or 0)) or None,
        # the run record of issue 12 (absent from older manifests)
        train_precision=train.get("precision"),
        gpu_type=train.get("gpu_type"),
        peak_memory_mb=train.get("peak_memory_mb"),
        train_cost_usd=train.get("cost_usd"),
        endpoint_calls=total("endpoint_calls"),
        cache_hits=total("cache_hits"),
        retries=total("retries"),
        errors=total("errors"),
        completion_tokens=total("completion_tokens"),
        eval_seconds=round(sum(r.cost.wall_s for r in evaluated.values()), 3),
        judge_calls=total("judge_calls"),
        judge_cache_hits=total("judge_cache_hits"),
        judge_failures=total("judge_failures"),
        judge_tokens=total("judge_prompt_tokens") + total("judge_completion_tokens"),
    )
