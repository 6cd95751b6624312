"""A/B experiments on live traffic: two releases of one model share its users, a sequential test judges.

`start` routes `share`% of the users (sticky: mlops/serving/routing.py hashes the `x-mlops-user`
key with the experiment's id) to a release while production (arm A) keeps the rest; `status`
reads the captured traffic and `mlops feedback` labels since the start and replays them through
the mSPRT (mlops/evals/sequential.py); `stop` ends it, writes the final record to
`experiments/<model>/<id>.json` and, with `promote_winner`, makes a winning treatment production
in the same compare-and-swap that ends the experiment. Started with `auto_stop`, the rollout
controller ends it itself (mlops/experiment_controller.py) through the same `stop`.

The record lives in `State.experiment` while it runs (the registry's shape, see releases.py). A
rollout and an experiment of one model exclude each other: each start refuses while the other runs.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlops.errors import GateFailed, UsageError
from mlops.evals.sequential import CONTINUE, WINNER_A, WINNER_B, Plan, Result, replay
from mlops.flows.session import Session, resolve_release
from mlops.registry.releases import State
from mlops.util import now, percentile

EXPERIMENTS_PREFIX = "experiments"
# metrics read from capture alone, and whether higher is better
TRAFFIC_METRICS = {"error_rate": False, "latency": False}
THUMBS = "thumbs"  # `mlops feedback <id> --thumbs up|down`: the conversion-like metric users give
BINARY_SUITE = ("json_valid", "regex")  # reference-free suite metrics that pass or fail
CONTINUOUS_SUITE = ("length",)
DEFAULT_MDE = 0.05  # a binary metric's planned absolute effect: 5 points
UNITS = ("request", "user")
# the final decision of an experiment stopped before its test decided (by hand, or at max_duration)
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    binary: bool
    higher_is_better: bool
    suite_spec: Any = None  # the suite's entry (regex: its pattern)


def metric_spec(s: Session, name: str) -> MetricSpec:
    """The metric an experiment may name, or a one-line error listing those it may."""
    from mlops.config import metric_name

    if name in TRAFFIC_METRICS:
        return MetricSpec(name, name == "error_rate", TRAFFIC_METRICS[name])
    if name == THUMBS:
        return MetricSpec(name, True, True)
    suite_specs = {metric_name(sp): sp for ev in s.loaded.cfg.evals.values() for sp in ev.metrics}
    if name in BINARY_SUITE + CONTINUOUS_SUITE:
        if s.loaded.cfg.monitor.capture != "full":
            raise UsageError(f"metric {name!r} scores answers: it needs monitor.capture: full (it is metadata)")
        return MetricSpec(name, name in BINARY_SUITE, name != "length", suite_specs.get(name, name))
    valid = sorted([*TRAFFIC_METRICS, THUMBS, *BINARY_SUITE, *CONTINUOUS_SUITE])
    raise UsageError(f"unknown experiment metric {name!r} (valid: {', '.join(valid)})")


def _running(rec: dict[str, Any]) -> bool:
    return bool(rec) and rec.get("status", "running") == "running"


def start(
    s: Session,
    release: str,
    share: int,
    metric: str,
    actor: str,
    *,
    alpha: float = 0.05,
    mde: float | None = None,
    min_samples: int = 100,
    max_samples: int = 10_000,
    unit: str = "user",
    auto_stop: bool = False,
    promote_winner: bool = False,
    max_duration: float | None = None,
) -> dict[str, Any]:
    """Route `share`% of users to `release` (arm B) against production (arm A); the record started.
    `unit`: what one observation is: each user's first request (or thumb), or each request.
    `auto_stop`: the rollout controller stops it at the test's verdict (promoting a winning B with
    `promote_winner`), or at `max_duration` seconds without one."""
    if not 1 <= share <= 99:
        raise UsageError(f"--share {share}: a percentage of users between 1 and 99")
    if unit not in UNITS:
        raise UsageError(f"--unit {unit!r}: one of {', '.join(UNITS)}")
    spec = metric_spec(s, metric)
    if (promote_winner or max_duration is not None) and not auto_stop:
        raise UsageError("--promote-winner and --max-duration on start go with --auto-stop")
    if max_duration is not None and not max_duration > 0:
        raise UsageError(f"--max-duration {max_duration:g}: a duration above 0, like 30m or 7d")
    if mde is None and not spec.binary:
        raise UsageError(f"--mde is needed for {metric!r}: the planned effect on its scale (latency: seconds)")
    plan = Plan(alpha, mde if mde is not None else DEFAULT_MDE, min_samples, max_samples, spec.binary)
    if not s.loaded.cfg.monitor.enabled or s.loaded.cfg.monitor.sample_rate <= 0:
        raise UsageError("experiments read captured traffic: monitor.enabled is off or monitor.sample_rate is 0")
    release = resolve_release(s, release)
    st, _ = s.registry.read_state()
    _refuse(st, release)
    s.backend.preflight(release)  # before any user is routed to it (exit 4 when it cannot load)
    s.backend.prepare(release)
    rec = {
        "id": f"exp-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}",
        "model": s.model,
        "release": release,
        "baseline": st.stages.get("production"),
        "releases": [st.stages.get("production"), release],
        "share": share,
        "metric": metric,
        "unit": unit,
        "higher_is_better": spec.higher_is_better,
        "alpha": plan.alpha,
        "tau": plan.tau,
        "min_samples": plan.min_samples,
        "max_samples": plan.max_samples,
        "test": "mSPRT",
        "auto_stop": {"promote_winner": promote_winner, "max_duration_s": max_duration} if auto_stop else {},
        "status": "running",
        "started_by": actor,
        "started_at": now(),
        "started_at_s": time.time(),
    }

    def change(st: State) -> State:
        _refuse(st, release)  # again inside the compare-and-swap: a rollout may have started since
        if st.stages.get("production") != rec["baseline"]:
            raise UsageError("production moved while the experiment was starting: run it again")
        st.experiment = rec
        st.routing = {str(rec["baseline"]): 100 - share, release: share}
        return st

    s.backend.set_state(change, reason=f"experiment {rec['id']}: {share}% of users to {release}", actor=actor)
    s.backend.record(release, "experiment_started", by=actor, experiment=rec["id"], share=share, metric=metric)
    return rec


def _refuse(st: State, release: str) -> None:
    if _running(st.rollout):
        raise UsageError(
            f"a rollout of {st.rollout.get('release')} is running on this model: an experiment waits for it"
        )
    lease = st.lease
    if lease.get("token") and float(lease.get("expires_at") or 0) > time.time():
        raise UsageError(f"{lease.get('owner') or 'a pipeline'} holds the rollout lease: start the experiment after it")
    if _running(st.experiment):
        raise UsageError(f"experiment {st.experiment.get('id')} is already running (mlops experiment stop)")
    prod = st.stages.get("production")
    if not prod:
        raise UsageError("no release is in production: an experiment compares a release with production")
    if release == prod:
        raise UsageError(f"{release} is production already: an experiment needs another release")
    if st.stages.get("canary") or set(st.routing) - {prod}:
        raise UsageError(f"traffic is split already ({st.routing}): finish the canary first")


def current(s: Session) -> dict[str, Any]:
    rec = s.registry.read_state()[0].experiment
    if not _running(rec):
        raise UsageError("no experiment is running (mlops experiment start RELEASE --metric M)")
    return rec


def plan_of(rec: dict[str, Any]) -> Plan:
    binary = rec["metric"] not in ("latency", *CONTINUOUS_SUITE)
    return Plan(
        float(rec["alpha"]),
        float(rec["tau"]),
        int(rec["min_samples"]),
        int(rec["max_samples"]),
        binary,
        bool(rec["higher_is_better"]),
    )


def analyse(s: Session, rec: dict[str, Any], until: float | None = None) -> dict[str, Any]:
    """The experiment's report: each arm's traffic and metric, the effect of B over A with its
    always-valid interval and p-value, the samples, and the decision."""
    from mlops.monitor.traffic import load_window

    arms = {"A": str(rec["baseline"]), "B": str(rec["release"])}
    arm_of = {v: k for k, v in arms.items()}
    w = load_window(s.registry.store, float(rec["started_at_s"]), until)
    recs = [r for r in w.records if r.get("release") in arm_of]
    spec = metric_spec(s, str(rec["metric"]))
    by_user = rec.get("unit") == "user"
    res = replay(_observations(s, spec, recs, arm_of, by_user), plan_of(rec))
    report = _report(rec, arms, recs, arm_of, res, w.skipped_lines + w.skipped_files)
    if by_user and (keyless := sum(1 for r in recs if not r.get("user"))):
        report["notes"].append(f"{keyless} requests without a user key are not counted (--unit user)")
    return report


def _first_per_user(items: list[tuple[dict[str, Any], Any]]) -> list[tuple[dict[str, Any], Any]]:
    """Each user's first (record, value) in arrival order; records without a user key left out."""
    seen: set[str] = set()
    out = []
    for r, v in items:
        u = r.get("user")
        if u and u not in seen:
            seen.add(u)
            out.append((r, v))
    return out


def _observations(
    s: Session, spec: MetricSpec, recs: list[dict[str, Any]], arm_of: dict[str, str], by_user: bool = False
) -> Iterator[tuple[str, float]]:
    """(arm, value) in arrival order. Refused requests (4xx) are the client's: not counted.
    `by_user`: one observation per user, their first (users are independent; one user's
    requests need not be, and the test assumes independent observations)."""
    pairs = list(_values(s, spec, recs))
    for r, v in _first_per_user(pairs) if by_user else pairs:
        yield arm_of[r["release"]], v


def _values(s: Session, spec: MetricSpec, recs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float]]:
    served = [r for r in recs if not 400 <= int(r.get("status") or 0) < 500]
    if spec.name == "error_rate":
        yield from ((r, float(int(r.get("status") or 0) >= 500)) for r in served)
    elif spec.name == "latency":
        ok = [r for r in served if r.get("status") == 200 and isinstance(r.get("latency_s"), int | float)]
        yield from ((r, float(r["latency_s"])) for r in ok)
    elif spec.name == THUMBS:
        yield from _thumbs(s, served)
    else:
        yield from _scored(s, spec, served)


def _thumbs(s: Session, recs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float]]:
    from mlops.monitor.traffic import load_thumbs

    by_id = {r["id"]: r for r in recs}
    votes = [
        (float(doc.get("time") or 0), rid, float(doc["thumbs"] == "up"))
        for rid, doc in load_thumbs(s.registry.store).items()
        if rid in by_id
    ]
    for _, rid, v in sorted(votes):  # thumbs arrive in their own order: that is the stream
        yield by_id[rid], v


def _scored(s: Session, spec: MetricSpec, recs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float]]:
    """A reference-free suite metric on each answer; a failed request fails it (it gave no answer)."""
    from mlops.evals.metrics import build_metric
    from mlops.evals.types import Case, Output

    metric = build_metric(spec.suite_spec, s.loaded.root)
    worst = 0.0 if spec.higher_is_better else math.inf
    for r in recs:
        if int(r.get("status") or 0) >= 500 or not isinstance(r.get("output"), str):
            if math.isfinite(worst):
                yield r, worst
            continue
        case, out = Case(str(r["id"]), str(r.get("prompt") or "")), Output(str(r["output"]))
        yield r, float(metric.score_batch([case], [out])[0].value)


def _arm_traffic(recs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = sum(1 for r in recs if int(r.get("status") or 0) >= 500)
    lat = [float(r["latency_s"]) for r in recs if r.get("status") == 200 and r.get("latency_s") is not None]
    return {
        "requests": len(recs),
        "errors": errors,
        "error_rate": errors / len(recs) if recs else 0.0,
        "p50_s": percentile(lat, 0.5),
        "p95_s": percentile(lat, 0.95),
    }


def _report(
    rec: dict[str, Any],
    arms: dict[str, str],
    recs: list[dict[str, Any]],
    arm_of: dict[str, str],
    res: Result,
    skipped: int,
) -> dict[str, Any]:
    traffic = {a: _arm_traffic([r for r in recs if arm_of[r["release"]] == a]) for a in arms}
    winner = {WINNER_A: arms["A"], WINNER_B: arms["B"]}.get(res.decision)
    doc = res.to_json()
    return {
        "id": rec["id"],
        "model": rec.get("model"),
        "metric": rec["metric"],
        "unit": rec.get("unit", "request"),
        "higher_is_better": rec["higher_is_better"],
        "test": "mSPRT",
        "alpha": rec["alpha"],
        "tau": rec["tau"],
        "arms": {
            a: {"release": rid, "share": 100 - rec["share"] if a == "A" else rec["share"]}
            | traffic[a]
            | {"n": doc[f"n_{a.lower()}"], "mean": doc[f"mean_{a.lower()}"]}
            for a, rid in arms.items()
        },
        "effect": doc["effect"],
        "relative": doc["relative"],
        "ci": doc["ci"],
        "p_value": doc["p_value"],
        "decision": res.decision,
        "winner": winner,
        "decided_at": doc["decided_at"],
        "samples": doc["n_a"] + doc["n_b"],
        "notes": doc["notes"] + ([f"{skipped} unreadable capture lines or files skipped"] if skipped else []),
        "started_at": rec["started_at"],
        "started_by": rec["started_by"],
        "auto_stop": rec.get("auto_stop") or {},
    }


def stop(s: Session, actor: str, promote_winner: bool = False, reason: str | None = None) -> dict[str, Any]:
    """End the running experiment: the final report is stored, all users go back to production,
    or (with `promote_winner` and B the winner) to B as the new production, in one write.
    `actor` decided (`controller:experiment` when it stopped itself); `reason`: why, if not asked."""
    rec = current(s)
    try:
        report = analyse(s, rec)
    except UsageError as e:  # the metric cannot be read now (capture set to metadata): it still ends
        arms = {"A": str(rec["baseline"]), "B": str(rec["release"])}
        res = Result(notes=[f"not analysed: {e.headline}"])
        report = _report(rec, arms, [], {v: k for k, v in arms.items()}, res, 0)
    if report["decision"] == CONTINUE:  # ended before the test decided: no verdict, ever
        report["decision"] = INCONCLUSIVE
    report |= {"stopped_at": now(), "stopped_by": actor, "decided_by": actor, "reason": reason or f"stopped by {actor}"}
    promote = promote_winner and report["decision"] == WINNER_B
    report["status"] = "promoted" if promote else "stopped"
    final = dict(rec) | {"status": report["status"], "report": report}
    # the record first: a crash before the state write leaves the experiment running, stop again
    key = f"{EXPERIMENTS_PREFIX}/{s.model}/{rec['id']}.json"
    s.registry.store.put(key, json.dumps(final, indent=2, sort_keys=True, default=str).encode())
    treatment, baseline = str(rec["release"]), str(rec["baseline"])

    def change(st: State) -> State:
        if st.experiment.get("id") != rec["id"]:
            raise UsageError(f"experiment {rec['id']} was stopped by someone else meanwhile")
        st.experiment = {}
        prod = st.stages.get("production") or baseline
        if promote:
            if prod != treatment:
                st.stages["previous"] = prod
            st.stages["production"] = treatment
            prod = treatment
        st.routing = {prod: 100}
        return st

    why = f"experiment {rec['id']}: {report['decision']}"
    s.backend.set_state(change, reason=why, actor=actor)
    detail = {
        "effect": round(report["effect"], 6),
        "ci": [None if x is None else round(x, 6) for x in report["ci"]],
        "p_value": round(report["p_value"], 6),
        "samples": report["samples"],
    }
    s.backend.record(
        treatment,
        "experiment_stopped",
        by=actor,
        experiment=rec["id"],
        decision=report["decision"],
        reason=report["reason"],
        **detail,
    )
    if promote:
        s.backend.record(treatment, "promoted", by=actor, reason=why, experiment=rec["id"], previous=baseline)
    report["production"] = treatment if promote else s.registry.read_state()[0].stages.get("production")
    if promote_winner and not promote:
        verdict = "production won" if report["decision"] == WINNER_A else f"no winner ({report['decision']})"
        report["message"] = f"{verdict}: {report['production']} stays production"
    return report


def not_promoted(report: dict[str, Any]) -> GateFailed | None:
    """`stop --promote-winner` that promoted nothing exits 3 (the workflows' 'not promoted')."""
    return GateFailed(str(report["message"])) if report.get("message") else None


def status(s: Session) -> dict[str, Any]:
    """The running experiment's report, or the last stopped one's as it was stored."""
    rec = s.registry.read_state()[0].experiment
    if _running(rec):
        return analyse(s, rec) | {"status": "running"}
    done = []
    for key in s.registry.store.list(f"{EXPERIMENTS_PREFIX}/{s.model}"):
        blob = s.registry.store.get(key) if key.endswith(".json") else None
        try:
            doc = json.loads(blob.data) if blob is not None else None
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("report"), dict):
            done.append(doc["report"])
    if not done:
        raise UsageError("no experiment has run on this model (mlops experiment start RELEASE --metric M)")
    return max(done, key=lambda r: str(r.get("stopped_at")))


def describe(report: dict[str, Any]) -> str:
    """The human text of a report (what `mlops experiment status` prints)."""
    better = "higher" if report["higher_is_better"] else "lower"
    m = f"{report['metric']} per {report.get('unit', 'request')}"
    lines = [
        f"experiment {report['id']} (mSPRT, alpha {report['alpha']:g}, tau {report['tau']:g}): {m}, {better} is better"
    ]
    for a, d in report["arms"].items():
        lines.append(
            f"  {a} {d['release']} {d['share']}%: {d['requests']} requests, "
            f"{d['error_rate']:.1%} errors, p95 {d['p95_s'] * 1000:.1f} ms"
        )
    arms = report["arms"]
    lines.append(
        f"  {m}: A {arms['A']['mean']:.4g} (n {arms['A']['n']}), B {arms['B']['mean']:.4g} (n {arms['B']['n']})"
    )
    lo, hi = report["ci"]
    ci = f"[{lo:+.4g}, {hi:+.4g}]" if lo is not None and hi is not None else "(none yet)"
    rel = f" ({report['relative']:+.1%})" if report["relative"] is not None else ""
    conf = f"{1 - float(report['alpha']):.0%}"
    lines.append(f"  effect B-A {report['effect']:+.4g}{rel}, {conf} always-valid CI {ci}, p {report['p_value']:.3g}")
    decided = f" at {report['decided_at']} observations" if report["decided_at"] else ""
    winner = f" ({report['winner']})" if report["winner"] else ""
    lines.append(f"  decision: {report['decision']}{winner}{decided}")
    lines += [f"  note: {n}" for n in report["notes"]]
    if (auto := report.get("auto_stop")) and report.get("status", "running") == "running":
        limit = auto.get("max_duration_s")
        then = "promotes a winning B" if auto.get("promote_winner") else "ends it"
        lines.append(
            f"  auto-stop: the rollout controller {then} at the verdict"
            + (f", or after {limit:g} s without one" if limit else "")
        )
    return "\n".join(lines)
