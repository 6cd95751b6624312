"""The guardrail after promotion: during `bake_after_promote` the rollout controller judges the
promoted release's captured window every `interval` against `deploy.rollout.guardrails`
(`check_slo`, mlops/rollout_analysis.py); a breach rolls back at once, recorded as
`controller:guardrail` with the breaches, in both releases' histories; after the bake the record
finishes as promoted.
"""

from __future__ import annotations

from typing import Any

from mlops.contracts import StepVerdict
from mlops.registry import rollouts
from mlops.registry.releases import State

# `ctl`: the mlops.rollout_controller.Controller calling (not imported: it imports this module)
Controller = Any


def guard(ctl: Controller, rec: dict[str, Any], now: float) -> str | None:
    """Production's captured window during `bake_after_promote`, judged every `interval` once it
    holds `guardrails.min_requests` requests: an SLO breach rolls back (mlops/rollout_analysis.py)."""
    from mlops.rollout_analysis import check_slo

    rid = rec["id"]
    promoted_at = float(rec.get("promoted_at", now))
    if now >= promoted_at + float(rec.get("bake_after_promote", 0)):
        return _passed(ctl, rec)
    # where the last controller's judging stopped (it saved it), or promotion
    since = ctl._checkpoint.setdefault(rid, float(rec.get("guard_checkpoint") or promoted_at))
    until = now - ctl._flush_lag()
    if until - since < float(ctl.cfg.interval):
        return None
    w = ctl._reader(rec).read(since, until)
    p95 = float((rec.get("baseline_stats") or {}).get("p95") or 0) or None
    # production's side of the last canary window it had traffic in (or its traffic before the
    # rollout): the PSIs' reference
    breaches = check_slo(w, ctl.cfg.guardrails, p95, ctl.reference(rec, before=True))
    if w.candidate.requests < ctl.cfg.guardrails.min_requests:
        return None  # the window grows until it holds enough requests
    if not breaches:
        ctl._checkpoint[rid] = until
        return None
    v = StepVerdict(
        step=0,
        percent=100,
        candidate=w.candidate.summary(),
        production=dict(rec.get("baseline_stats") or {}),
        passed=False,
        reasons=breaches,
        decided_by="controller:guardrail",
        mode="guardrail",
        decision="fail",
    )
    return _rollback(ctl, rec, v)


def _passed(ctl: Controller, rec: dict[str, Any]) -> str:
    why = f"guardrail bake of {float(rec['bake_after_promote']):g}s passed"
    ctl.registry.update_state(
        lambda st: st if rollouts.finish(st, "promoted", why, "controller:guardrail") else None,
        reason=why,
        actor="controller:guardrail",
    )
    ctl.backend.record(rec["release"], "guardrail_passed", by="controller:guardrail", rollout=rec["id"])
    rollouts.settle(ctl.registry)
    return f"{rec['release']}: {why}"


def _rollback(ctl: Controller, rec: dict[str, Any], v: StepVerdict) -> str:
    """Like an operator's rollback (it pre-empts any lease): production's SLO is breached now."""
    from mlops.registry.lease import preempt
    from mlops.rollout import _make_production

    why = "; ".join(v.reasons)
    back = rec["baseline"]
    ok = [False]

    def change(st: State) -> State | None:
        if (st.rollout or {}).get("id") != rec["id"] or rollouts.running(st) is None:
            return None
        if st.stages.get("production") != rec["release"]:
            return None
        ok[0] = True
        preempt(st)
        st.rollout["verdicts"] = [*st.rollout.get("verdicts", []), v.to_json()]
        rollouts.finish(st, "rolled_back", f"guardrail: {why}", "controller:guardrail")
        return _make_production(st, back)

    st = ctl.registry.update_state(change, reason=f"guardrail: {why}", actor="controller:guardrail")
    ctl.backend._publish(st)
    if not ok[0]:
        return "record ended meanwhile"
    ctl.backend.record(rec["release"], "rolled_back", by="controller:guardrail", reasons=v.reasons, rollout=rec["id"])
    ctl.backend.record(back, "rolled_back_to", by="controller:guardrail", reason=f"guardrail: {why}")
    rollouts.settle(ctl.registry)
    return f"guardrail rolled back {rec['release']} to {back}: {why}"
