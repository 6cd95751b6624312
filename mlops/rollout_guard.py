"""The guardrail after promotion: during `bake_after_promote` the rollout controller judges the
promoted release's captured window every `interval` against `deploy.rollout.guardrails`
(`check_slo`, mlops/rollout_analysis.py); a breach rolls back at once, recorded as
`controller:guardrail` with the breaches, in both releases' histories; after the bake the record
finishes as promoted.

A controller's memory may not last the bake (on Modal each scheduled invocation is a new one), so
what the guardrail needs is in the record: production's reference window (`reference`) and where
its judging stopped (`save`, as a controller stops).
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
    breaches = check_slo(w, ctl.cfg.guardrails, p95, reference(ctl, rec, before=True))
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


def save(ctl: Controller) -> None:
    """What a successor needs that lives in memory only: where the guardrail's next window starts
    (a scheduled invocation on Modal ends every period; the next judges on from there, not from
    promotion). Written when this controller stops, not every interval (one write, no publish)."""
    for rid, t in list(ctl._checkpoint.items()):

        def change(st: State, rid: str = rid, t: float = t) -> State | None:
            rec = rollouts.running(st)
            if rec is None or rec.get("id") != rid or rec.get("phase") != "bake_after_promote":
                return None
            if t <= float(rec.get("guard_checkpoint") or rec.get("promoted_at") or 0):
                return None
            rec["guard_checkpoint"] = t
            return st

        ctl.registry.update_state(change, reason="guardrail checkpoint", actor=ctl.owner, quiet=True)


def reference(ctl: Controller, rec: dict[str, Any], before: bool = False) -> Any:
    """Production's side of the rollout's last live window that held enough of its requests: what
    the 100% step and the guardrail's length PSIs compare with (production has no traffic then).
    Kept in memory by the controller that judged it; read back from the captures of the window
    the record names (`baseline_window`) by any other (the next scheduled invocation on Modal).
    `before` (the guardrail): with no such window (a canary on replayed eval prompts), production's
    captured traffic in the `bake_after_promote` before the rollout started."""
    rid = rec["id"]
    window = rec.get("baseline_window")
    if window is None and before:
        start = float(rec["started_at"])
        window = [start - max(float(rec.get("bake_after_promote") or 0), float(ctl.cfg.interval)), start]
    if rid not in ctl._baseline and window:
        from mlops.rollout_analysis import read_window

        since, until = (float(t) for t in window)
        side = read_window(ctl.registry, rec["release"], rec["baseline"], since, until).production
        ctl._baseline[rid] = side if side.requests else None
    return ctl._baseline.get(rid)


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
