"""Starting a rollout (`mlops run/deploy`, with or without --wait) and saying where it stands.

`start` writes the model's rollout record (mlops/registry/rollouts.py) in one compare-and-swap;
who advances it is the record's `driver`: the CI job itself (`--wait`) or the rollout controller
(mlops/rollout_controller.py) once the job returned (`--no-wait`).
"""

from __future__ import annotations

import time
from typing import Any

from mlops.backends.base import Backend
from mlops.config import Loaded
from mlops.errors import UsageError
from mlops.registry import rollouts
from mlops.registry.lease import live
from mlops.registry.releases import State
from mlops.rollout import Prompt


def canary_prompts(loaded: Loaded) -> list[Prompt]:
    """What replayed canary traffic asks: the first eval suite's inputs (a chat case's turns)."""
    from mlops.evals.harness import load_cases

    cfg = loaded.cfg
    model_cfg = cfg.models[cfg.deploy.model]
    cases = load_cases(loaded, next(iter(cfg.evals))) if cfg.evals else []
    prompts: list[Prompt] = [
        [dict(m) for m in c.messages] if c.messages else model_cfg.prompt.format(input=c.input) for c in cases
    ]
    return prompts or ["hello"]


def start(backend: Backend, release: str, driver: str, started_by: str) -> dict[str, Any]:
    """Write a running canary record for `release` (against today's production). `driver`:
    "pipeline" (the job follows it, `--wait`) or "controller" (the job returns; the first step's
    weights are set by the controller's first tick, so no canary traffic flows until one runs).
    A guardrail bake still running for the production it replaces ends here (superseded); an
    A/B experiment on the model refuses it."""
    cfg = backend.cfg
    rec: dict[str, Any] = {}

    def change(st: State) -> State:
        ex = st.experiment
        if ex and ex.get("status", "running") == "running":
            raise UsageError(
                f"an A/B experiment ({ex.get('id', '?')}) runs on model {cfg.deploy.model}: "
                "a rollout and an experiment exclude each other (`mlops experiment stop` first)"
            )
        cur = rollouts.running(st)
        if cur is not None and cur.get("phase") in ("shadow", "canary"):
            raise UsageError(f"rollout {cur['id']} of {cur['release']} is still running (see `mlops status`)")
        if cur is not None:  # its guardrail bake: the release it watched is the new baseline
            rollouts.finish(st, "promoted", f"guardrail bake superseded by a rollout of {release}", started_by)
        prod = st.stages.get("production")
        assert prod is not None and prod != release
        rec.clear()
        rec.update(rollouts.new_record(cfg.deploy.model, release, prod, cfg.deploy.rollout, driver, started_by))
        if driver == "controller":
            rec["applied"] = -1  # the controller sets step 1's weights
        st.rollout = dict(rec)
        return st

    rollouts.settle(backend.registry)  # a finished record left in the state: archived first
    backend.set_state(change, reason=f"rollout {release} started ({driver} drives it)", actor=started_by)
    rollouts.settle(backend.registry)  # a superseded guardrail record
    backend.record(release, "rollout_started", by=started_by, rollout=rec["id"], driver=driver, steps=rec["steps"])
    return rec


def where(st: State, at: float | None = None) -> str:
    """One line: where the model's rollout stands (for `mlops status`)."""
    rec = st.rollout
    t = time.time() if at is None else at
    if not rec:
        return "no rollout running"
    head = f"rollout {rec['id']} of {rec['release']} {rec['status']}"
    if rec.get("status") != rollouts.RUNNING:
        return f"{head}: {rec.get('reason', '')} (by {rec.get('decided_by', '?')})"
    if rec.get("phase") == "bake_after_promote":
        left = float(rec.get("promoted_at", t)) + float(rec.get("bake_after_promote", 0)) - t
        return f"{head}: promoted, guardrail bake ({max(left, 0):.0f}s left; previous {rec['baseline']} kept warm)"
    steps = rec.get("steps", [])
    i = int(rec.get("step", 0))
    lease = st.lease or {}
    who = f"; lease {lease.get('owner')}" if live(lease, t) else "; no live lease"
    if rec.get("phase") == "shadow":
        return f"{head}: {_shadow(rec, t)}; driver {rec.get('driver')}{who}"
    if int(rec.get("applied", i)) != i:
        return (
            f"{head}: waiting for a rollout controller to set step {i + 1} ({steps[i]}%): is `mlops serve` running "
            "(on Modal: the ...-controller app deployed; it runs once a minute)?"
        )
    due = float(rec.get("due_at", rec.get("step_started_at", t))) - t
    judged = f"judged in {due:.0f}s" if due > 0 else "being judged"
    ext = f", extended {rec['extensions']}x" if rec.get("extensions") else ""
    return f"{head}: step {i + 1}/{len(steps)} ({steps[i]}%), {judged}{ext}; driver {rec.get('driver')}{who}"


def _shadow(rec: dict[str, Any], t: float) -> str:
    """The shadow phase: its share, and the mirrored window so far (as the controller last wrote it)."""
    share = float(rec.get("shadow", 0))
    if rec.get("driver") != "controller":  # the job follows its window itself and says it when judged
        return f"shadow step: {share:.0%} of production's traffic mirrored (no user traffic yet), judged by the CI job"
    if not rec.get("shadow_started_at"):
        return f"shadow ({share:.0%} to be mirrored): waiting for a rollout controller: is `mlops serve` running?"
    seen = rec.get("mirrored") or {}
    n, agree = int(seen.get("mirrored", 0)), float(seen.get("agreement", 0.0))
    so_far = (
        f"{n} mirrored, agreement {agree:.0%}, {int(seen.get('errors', 0))} errors so far" if n else "none mirrored yet"
    )
    due = float(rec.get("due_at", t)) - t
    judged = f"judged in {due:.0f}s" if due > 0 else "being judged"
    ext = f", extended {rec['extensions']}x" if rec.get("extensions") else ""
    return f"shadow step: {share:.0%} of production's traffic mirrored (no user traffic yet), {so_far}, {judged}{ext}"
