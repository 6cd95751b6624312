"""A model's rollout record (`State.rollout`): the state machine the rollout controller advances.

The record lives in the model's State, so every move of it is the same compare-and-swap that moves
the routing it describes: a step's weights and the step number, a promotion and the phase that
follows it, a rollback and the reason, never one without the other.

    {"id", "model", "release", "baseline", "releases": [release, baseline],
     "status": "running" | "promoted" | "rolled_back" | "aborted",
     "phase": "shadow" | "canary" | "bake_after_promote",   # shadow first when deploy.rollout.shadow > 0
     "shadow": share, "shadow_started_at", "mirrored": {"mirrored", "agreement", "errors", "at"},
     "driver": "pipeline" | "controller",   # who advances the canary (the CI job with --wait)
     "steps", "step", "step_started_at", "bake", "traffic", "extensions",
     "bake_after_promote", "promoted_at", "baseline_stats", "verdicts": [...],
     "baseline_window": [since, until],   # production's last live window with enough requests
     "guard_checkpoint",                  # where the guardrail's next window starts (a controller's stop)
     "started_by", "started_at", "finished_at", "decided_by", "reason"}

A finished record is written once to `rollouts/<model>/<id>.json` in the store and then cleared
from the State (`settle`): whoever sees a finished record still in the State (a controller's
tick, the writer itself) finishes that job, so a crash between the two writes loses nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from mlops.errors import ConflictError
from mlops.registry.releases import Registry, State
from mlops.util import now

RUNNING = "running"
FINISHED = ("promoted", "rolled_back", "aborted")
ARCHIVE = "rollouts"


def new_id() -> str:
    return f"ro-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def new_record(
    model: str,
    release: str,
    baseline: str,
    rollout: Any,
    driver: str,
    started_by: str,
    at: float | None = None,
) -> dict[str, Any]:
    """A running canary record for `release` against production `baseline` (`rollout`: the
    model's `deploy.rollout`, whose steps and bake are copied: the record is what is carried out)."""
    t = time.time() if at is None else at
    return {
        "id": new_id(),
        "model": model,
        "release": release,
        "baseline": baseline,
        "releases": [release, baseline],
        "status": RUNNING,
        # mirrored traffic only first (mlops/rollout_shadow.py): the candidate answers no user yet
        "phase": "shadow" if float(rollout.shadow) > 0 else "canary",
        "shadow": float(rollout.shadow),
        "driver": driver,
        "steps": list(rollout.steps),
        "step": 0,
        "step_started_at": t,
        "bake": float(rollout.bake),
        "traffic": rollout.traffic,
        "extensions": 0,
        "bake_after_promote": float(rollout.bake_after_promote),
        "verdicts": [],
        "started_by": started_by,
        "started_at": t,
    }


def running(st: State) -> dict[str, Any] | None:
    rec = st.rollout
    return rec if rec and rec.get("status") == RUNNING else None


def finish(st: State, status: str, reason: str, by: str, at: float | None = None) -> dict[str, Any] | None:
    """Mark the running record finished (in the caller's change of `st`); the record, or None."""
    rec = running(st)
    if rec is None:
        return None
    assert status in FINISHED, status
    rec.update(status=status, reason=reason, decided_by=by, finished_at=time.time() if at is None else at)
    return rec


def promoted(st: State, release: str, by: str, reason: str, at: float | None = None) -> None:
    """`release` was just made production (in the caller's change): the record of its canary
    either enters its guardrail bake (driven by the controller from here on) or finishes."""
    rec = running(st)
    if rec is None or rec.get("release") != release:
        return
    t = time.time() if at is None else at
    if float(rec.get("bake_after_promote", 0)) > 0:
        rec.update(phase="bake_after_promote", driver="controller", promoted_at=t, promoted_by=by)
    else:
        finish(st, "promoted", reason, by, t)


def archive_key(model: str, rollout_id: str) -> str:
    return f"{ARCHIVE}/{model}/{rollout_id}.json"


def settle(registry: Registry) -> dict[str, Any] | None:
    """A finished record still in the State: written to the archive (once), then cleared.
    Returns the record it archived, or None when there was none."""
    st, _ = registry.read_state()
    rec = st.rollout
    if not rec or rec.get("status") == RUNNING:
        return None
    model = str(rec.get("model") or registry.model or "default")
    data = json.dumps(rec, indent=2, sort_keys=True).encode()
    try:
        registry.store.put(archive_key(model, str(rec["id"])), data, if_none_match=True)
    except ConflictError:
        pass  # written by whoever settled it first: the same finished record

    def clear(s: State) -> State | None:
        if (s.rollout or {}).get("id") != rec["id"] or s.rollout.get("status") == RUNNING:
            return None
        s.rollout = {}
        return s

    registry.update_state(clear, reason=f"rollout {rec['id']} {rec['status']}", actor="controller", quiet=True)
    return rec


def history(registry: Registry, model: str) -> list[dict[str, Any]]:
    """Every finished rollout of `model`, newest first."""
    out = []
    for key in registry.store.list(f"{ARCHIVE}/{model}"):
        blob = registry.store.get(key)
        if blob is not None and key.endswith(".json"):
            out.append(json.loads(blob.data))
    return sorted(out, key=lambda r: float(r.get("started_at", 0)), reverse=True)


def when(t: float | None) -> str:
    return now() if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
