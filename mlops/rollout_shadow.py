"""The shadow step (`deploy.rollout.shadow` > 0): before any user sees the candidate, that share of
production's requests is mirrored to it; users get production's answers only. The candidate's
errors and latency on the mirrored requests are judged like a canary step's (`analyse(...,
mode="shadow")`), and how often both outputs agree is recorded beside the verdict.

Two drivers walk it with the same pieces (mlops/rollout.py `mirror`, `shadow_verdict`): the CI job
with `--wait` (mlops/rollout.py `canary`), and the rollout controller after `--no-wait` (`step` here, the record's
first phase `shadow`): it mirrors in the write that takes the lease, waits for the mirrored
window (bounded: too few mirrored requests extend it like a canary step's, then it is judged,
fails, or falls back to replayed eval prompts as `analysis.on_insufficient_traffic` says), then
moves on to canary step 1 or rolls back ("aborted in shadow": the candidate never answered a user).
"""

from __future__ import annotations

import math
import time
from typing import Any

from mlops.config import RolloutCfg
from mlops.registry.releases import State
from mlops.rollout import SHADOW_SETTLE_S, TOP_UP_LIMIT, mirror, read_stats, seen, settled, shadow_verdict, wait_served

# `ctl`: the mlops.rollout_controller.Controller calling (not imported: it imports this module)
Controller = Any
REPLAY_OFFSET = 100_000  # replayed shadow traffic as users of its own, apart from the canary steps'


# ---------------------------------------------------------------------------- the controller's phase


def step(ctl: Controller, st: State, rec: dict[str, Any], now: float) -> str | None:
    """One tick of the record's `shadow` phase."""
    rid, release = rec["id"], rec["release"]
    share = float(rec.get("shadow") or ctl.cfg.shadow)
    if not rec.get("shadow_started_at"):
        return _start(ctl, rec, share)
    since = ctl._since.get((rid, -1), float(rec["shadow_started_at"]))
    doc = read_stats(ctl.base_url, since, ctl.api_key, ctl.model_param)
    sh = seen(doc, release)
    due = float(rec.get("due_at", rec["shadow_started_at"]))
    if now < due or (int(doc.get("shadow_pending", 0)) > 0 and now < due + SHADOW_SETTLE_S):
        _progress(ctl, st, rec, sh, now)
        return None
    live = rec.get("traffic") == "live"
    an = ctl.cfg.analysis
    n, need = int(sh.get("mirrored", 0)), _need(ctl.cfg, share, live)
    ext = int(rec.get("extensions", 0))
    notes: list[str] = []
    if n < need and ext < (an.max_extensions if live else TOP_UP_LIMIT):
        return ctl._extend(rec, -1, f"{n} of {need} mirrored requests")
    if n < need and live and an.on_insufficient_traffic == "replay":
        # replayed eval prompts sent as users: production answers them, `share` of them mirrored
        ctl._send(rec, math.ceil((need - n) / share) + 1, REPLAY_OFFSET * 2)
        doc = settled(ctl.base_url, since, ctl.api_key, ctl.model_param)
        notes.append(f"too little live traffic after {ext} extensions ({n} of {need} mirrored): eval prompts replayed")
    v = shadow_verdict(doc, release, ctl.cfg, share)
    v.decided_by, v.notes = "controller:analysis", notes + v.notes
    have = int(v.candidate.get("requests", 0))
    if live and have < need:  # the canary's rule: a step short of traffic at the end fails
        where = "replayed traffic" if notes else f"live traffic after {ext} extensions"
        v.passed, v.reasons = False, [f"too little {where}: {have} of {need} mirrored requests", *v.reasons]
    ctl.backend.record(release, "canary_step", by=v.decided_by, rollout=rid, **v.to_json())
    if not v.passed:
        return str(ctl._rolled_back(rec, v))
    return str(ctl._apply(rec, 0, v, {}))


def _need(cfg: RolloutCfg, share: float, live: bool) -> int:
    """Mirrored requests the step wants: `analysis.min_requests` on live traffic; on replayed
    traffic the share of `requests_per_step` that the mirror takes (as a canary step's)."""
    return int(cfg.analysis.min_requests) if live else max(1, math.ceil(cfg.requests_per_step * share))


def _start(ctl: Controller, rec: dict[str, Any], share: float) -> str:
    """Mirror `share` to the candidate in the write that takes the lease; replayed traffic sent."""

    def change(st: State) -> State:
        mirror(st, rec["release"], share)
        t = time.time()
        st.rollout.update(shadow=share, shadow_started_at=t, due_at=t + float(rec["bake"]), extensions=0)
        return st

    why = f"shadow: {share:.0%} of traffic mirrored to {rec['release']} (controller)"
    new = ctl._write(rec["id"], change, reason=why, actor="controller")
    if new is None:
        return "record ended meanwhile"
    wait_served(ctl.base_url, new.version)
    ctl._since[(rec["id"], -1)] = time.time()
    if rec.get("traffic") == "replay":
        ctl._send(rec, int(ctl.cfg.requests_per_step), REPLAY_OFFSET)
    return f"shadow: {share:.0%} of production's traffic mirrored to {rec['release']}"


def _progress(ctl: Controller, st: State, rec: dict[str, Any], sh: dict[str, Any], now: float) -> None:
    """The mirrored window so far into the record (for `mlops status`), at most once per `interval`
    and only when it moved; otherwise just the lease's heartbeat."""
    so_far = {"mirrored": int(sh.get("mirrored", 0)), "agreement": round(float(sh.get("agreement", 0.0)), 4)}
    so_far["errors"] = int(sh.get("errors", 0))
    last = dict(rec.get("mirrored") or {})
    if {k: last.get(k) for k in so_far} == so_far or now - float(last.get("at", 0)) < float(ctl.cfg.interval):
        ctl._renew(st, rec["id"])
        return

    def change(s: State) -> State:
        s.rollout["mirrored"] = {**so_far, "at": now}
        return s

    ctl._write(rec["id"], change, reason=f"shadow: {so_far['mirrored']} mirrored so far", actor="controller")
