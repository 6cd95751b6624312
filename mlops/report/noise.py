"""The report's noise section, and the cases a gate leaves out (see mlops/evals/noise.py).

Read from the registry only: production's stored per-case values (what the regression gates can
resolve, how old the baseline is), the release's own stored values (flaky cases, judge spread) and
the stored results of releases with identical weights.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from mlops.config import Config
from mlops.contracts import EvalResult
from mlops.evals import noise
from mlops.evals.gates import label
from mlops.registry.releases import Registry
from mlops.report.model import BaselineAge, CaseSpread, FlakyCase, GateNoise, Noise

IDENTICAL_LOOKBACK = 30  # releases of the model searched for identical weights (manifests read)
MAX_SPREADS = 50  # cases with a judge spread listed in the JSON (widest first)
MAX_FLAKY = 100  # flaky cases listed in the JSON (the report's JSON stays bounded whatever the suite)


def identical_results(reg: Registry, release: str, suite: str) -> list[EvalResult]:
    """Stored results on `suite` of other releases whose artifact has `release`'s sha256."""
    m = reg.manifest(release)
    sha = ((m or {}).get("artifact") or {}).get("sha256")
    if not sha:
        return []
    out = []
    same_model = [e for e in reg.index() if e.get("model") == m.get("model") and e["id"] != release]  # type: ignore[union-attr]
    for e in same_model[:IDENTICAL_LOOKBACK]:
        other = reg.manifest(e["id"])
        if other and (other.get("artifact") or {}).get("sha256") == sha and (r := reg.get_eval(e["id"], suite)):
            out.append(r)
    return out


def flaky_by_suite(reg: Registry, cfg: Config, results: dict[str, EvalResult]) -> list[noise.Flaky]:
    out: list[noise.Flaky] = []
    for suite, res in results.items():
        out += noise.flaky_cases(res, noise.thresholds(cfg.gates, suite), identical_results(reg, res.release, suite))
    return out


def exclusions(
    reg: Registry, cfg: Config, results: dict[str, EvalResult]
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(quarantine, flaky), suite -> case ids: what check_gates keeps out."""
    quarantine = {suite: set(ev.quarantine) for suite, ev in cfg.evals.items() if ev.quarantine}
    flaky: dict[str, set[str]] = {}
    if any(g.exclude_flaky for g in cfg.gates):
        for f in flaky_by_suite(reg, cfg, results):
            flaky.setdefault(f.suite, set()).add(f.id)
    return quarantine, flaky


def _age_days(created_at: str | None, now: dt.datetime) -> float | None:
    if not created_at:
        return None
    try:
        t = dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (now - t).total_seconds() / 86400


def build_noise(
    reg: Registry,
    cfg: Config,
    results: dict[str, EvalResult],
    baseline: dict[str, EvalResult | None],
    prod_reg: Registry | None = None,
    now: dt.datetime | None = None,
) -> Noise:
    """The noise section for `results` (a release's stored results; {} before a run) against
    `baseline` (production's stored results per suite, None where there are none)."""
    now = now or dt.datetime.now(dt.UTC)
    prod_reg = prod_reg or reg
    quarantine = {suite: set(ev.quarantine) for suite, ev in cfg.evals.items()}
    # flaky cases: the release's own, and production's (before a run, production's are all there is)
    flaky = flaky_by_suite(reg, cfg, results)
    seen = {(f.suite, f.metric, f.id) for f in flaky}
    flaky += [
        f
        for f in flaky_by_suite(prod_reg, cfg, {k: v for k, v in baseline.items() if v is not None})
        if (f.suite, f.metric, f.id) not in seen
    ]
    flaky_ids: dict[str, set[str]] = {}
    for f in flaky:
        flaky_ids.setdefault(f.suite, set()).add(f.id)
    doc = Noise()
    for g in cfg.gates:
        if g.max_regression is None or (base := baseline.get(g.eval)) is None:
            continue
        drop = quarantine.get(g.eval, set()) | (flaky_ids.get(g.eval, set()) if g.exclude_flaky else set())
        values = noise.gate_values(base, g, drop)
        if values is None:
            continue
        m = noise.mde(values, g.confidence)
        warn = None
        if m is not None and g.max_regression < m:
            warn = (
                f"gate {label(g)}: max_regression {g.max_regression:g} is below what {len(values)} cases can "
                f"resolve (MDE {m:.3g} at {g.confidence:.0%} confidence, {noise.POWER:.0%} power): "
                "add cases or loosen the gate"
            )
            doc.warnings.append(warn)
        doc.gates.append(
            GateNoise(
                gate=label(g),
                n=len(values),
                mde=m,
                max_regression=g.max_regression,
                confidence=g.confidence,
                power=noise.POWER,
                warning=warn,
            )
        )
    doc.flaky_total = len(flaky)
    for f in flaky[:MAX_FLAKY]:
        by = [
            label(g)
            for g in cfg.gates
            if g.eval == f.suite and (f.id in quarantine.get(f.suite, set()) or g.exclude_flaky)
        ]
        doc.flaky.append(
            FlakyCase(
                suite=f.suite,
                metric=f.metric,
                id=f.id,
                why=f.why,
                quarantined=f.id in quarantine.get(f.suite, set()),
                excluded_by=by,
            )
        )
    if flaky:
        doc.warnings.append(f"{len(flaky)} flaky case(s): " + ", ".join(f"{f.suite}/{f.id}" for f in flaky[:10]))
    spreads = [
        CaseSpread(suite=suite, metric=metric, id=c.id, samples=xs, spread=noise.spread(xs))
        for suite, res in (results or {k: v for k, v in baseline.items() if v is not None}).items()
        for c in res.cases
        for metric, xs in c.samples.items()
    ]
    doc.spreads = sorted(spreads, key=lambda s: -s.spread)[:MAX_SPREADS]
    for suite, base in baseline.items():
        if base is None:
            continue
        age = _age_days(base.created_at, now)
        limit = cfg.evals[suite].baseline_max_age
        stale = age is not None and limit is not None and age * 86400 > limit
        doc.baselines.append(
            BaselineAge(suite=suite, release=base.release, created_at=base.created_at, age_days=age, stale=stale)
        )
        if stale and limit is not None:
            doc.warnings.append(
                f"baseline {base.release} on {suite} is {age:.0f} days old (more than {limit / 86400:g}): "
                "re-evaluate production (`mlops eval --release production`)"
            )
    return doc


def before_run(reg: Registry, cfg: Config) -> Noise:
    """The noise section `mlops plan` shows: production's stored results are all there is."""
    prod = reg.read_state()[0].stages.get("production")
    baseline = {suite: reg.get_eval(prod, suite) if prod else None for suite in cfg.evals}
    return build_noise(reg, cfg, {}, baseline)


def plan_lines(doc: Noise) -> list[str]:
    """What `mlops plan` prints about noise."""
    lines = []
    for g in doc.gates:
        if g.mde is None:
            continue
        verdict = "WARNING: below it" if g.warning else "ok"
        lines.append(
            f"gate {g.gate}: can detect a regression of {g.mde:.3g} or more ({g.n} cases, "
            f"{g.confidence:.0%} confidence, {g.power:.0%} power); max_regression {g.max_regression:g}: {verdict}"
        )
    for f in doc.flaky:
        note = (
            " (quarantined)"
            if f.quarantined
            else (" (excluded by " + ", ".join(f.excluded_by) + ")" if f.excluded_by else "")
        )
        lines.append(f"flaky: {f.suite}/{f.id} {f.metric}: {f.why}{note}")
    for b in doc.baselines:
        if b.stale:
            lines.append(f"stale baseline: {b.suite} results of {b.release} are {b.age_days:.0f} days old")
    return lines


def as_json(doc: Noise) -> dict[str, Any]:
    return doc.model_dump(mode="json")
