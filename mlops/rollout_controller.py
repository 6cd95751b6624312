"""The rollout controller: advances a model's rollout record (`State.rollout`) on its own clock, so a
rollout outlives the CI job that started it.

`Controller.tick()` is one step of the state machine: read the record; when the current step's
bake is over, judge the step's window of live requests (the gateway's per-release stats since the
step began), then move to the next step, promote, roll back, or bake the step again when it saw too
little traffic; every move is one compare-and-swap that also holds (takes or renews) the rollout
lease. After promotion, during `bake_after_promote`, it judges production's live window every
`interval` and rolls back on an SLO breach (`controller:guardrail`).

Who runs it: on `backend: local` a thread of `mlops serve` (and of the server `mlops run` starts for
itself, where it idles while the run holds the lease); on Modal a scheduled function
(functions/controller.py) that ticks it against the gateway. Lease rules: one writer. A canary the
CI job drives (`--wait`) is the job's; once the job's lease expires (killed), the controller aborts
it. An operator's `mlops rollback` ends the record in its own write; the controller sees it and stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from mlops.backends.base import Backend
from mlops.config import Loaded, RolloutCfg
from mlops.contracts import StepVerdict
from mlops.errors import MlopsError, UsageError
from mlops.registry import rollouts
from mlops.registry.lease import live, owner_name, recover_routing
from mlops.registry.releases import State
from mlops.rollout import MIN_LATENCY_SAMPLES, Prompt, _drive, analyse, wait_served

log = logging.getLogger("mlops.controller")

Judge = Callable[[int, int, dict[str, float], dict[str, float], RolloutCfg, str], StepVerdict]


class _Busy(Exception):
    """Another writer holds a live rollout lease: this tick does nothing."""


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
        if cur is not None and cur.get("phase") == "canary":
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


def _weights(prod: str, release: str, pct: int) -> dict[str, int]:
    return {prod: 100 - pct, release: pct} if pct < 100 else {release: 100}


class Controller:
    """One model's rollout controller: `tick()` on a clock (`start()` runs it in a thread)."""

    def __init__(
        self,
        backend: Backend,
        base_url: str,
        api_key: str | None = None,
        model_param: str | None = None,
        judge: Judge = analyse,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.registry = backend.registry
        self.cfg = backend.cfg.deploy.rollout
        self.model = backend.cfg.deploy.model
        self.base_url = base_url
        self.api_key = api_key
        self.model_param = model_param  # ?model=NAME on a server with several models
        self.judge = judge
        self.clock = clock
        self.owner = owner_name("controller")
        import secrets

        self.token = secrets.token_hex(8)
        self._since: dict[tuple[str, int], float] = {}  # (rollout, step) -> when the server served it
        self._checkpoint: dict[str, float] = {}  # rollout -> start of production's next guardrail window
        self._prompts: list[Prompt] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: str | None = None  # what the last tick did (for tests and `mlops status`)

    # ------------------------------------------------------------------ the loop

    def start(self) -> Controller:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"rollout-controller-{self.model}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._drop_lease()

    def period(self) -> float:
        # a quarter of the analysis interval (bounded): a window is judged at most this late
        return min(max(float(self.cfg.interval) / 4, 0.05), 1.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.period()):
            try:
                did = self.tick()
            except Exception as e:  # a store or endpoint hiccup: the next tick tries again
                log.warning("rollout controller: %s", getattr(e, "headline", None) or repr(e))
                continue
            if did:
                self.last = did
                log.info("rollout controller (%s): %s", self.model, did)

    # ------------------------------------------------------------------ one tick

    def tick(self) -> str | None:
        """One step of the state machine; what it did, or None (nothing due)."""
        st, _ = self.registry.read_state()
        rec = st.rollout
        if not rec:
            return None
        if rec.get("status") != rollouts.RUNNING:
            done = rollouts.settle(self.registry)
            return f"archived rollout {done['id']} ({done['status']})" if done else None
        now = self.clock()
        try:
            if rec.get("phase") == "bake_after_promote":
                return self._guard(rec, now)
            if rec.get("driver") != "controller":
                return self._orphaned(st, rec)
            return self._canary(st, rec, now)
        except _Busy:
            return None

    # ------------------------------------------------------------------ writes

    def _write(self, rid: str, change: Callable[[State], State | None], reason: str, actor: str) -> State | None:
        """`change` applied to the state while record `rid` still runs, taking or renewing the
        lease in the same write (None when the record ended meanwhile: someone else decided)."""
        done = [False]

        def guarded(st: State) -> State | None:
            cur = st.lease or {}
            if live(cur) and cur.get("token") != self.token:
                raise _Busy
            if (st.rollout or {}).get("id") != rid or rollouts.running(st) is None:
                return None
            new = change(st)
            if new is not None:
                done[0] = True
                if rollouts.running(new) is None:  # finished: the lease goes with it
                    new.lease = {}
                else:
                    t = time.time()
                    new.lease = {
                        "owner": self.owner,
                        "token": self.token,
                        "acquired_at": cur.get("acquired_at", t) if cur.get("token") == self.token else t,
                        "heartbeat_at": t,
                        "expires_at": t + float(self.cfg.lease_ttl),
                    }
            return new

        st = self.registry.update_state(guarded, reason=reason, actor=actor)
        self.backend._publish(st)  # lease renewals too: Modal's gateway reads the Dict
        return st if done[0] else None

    def _drop_lease(self) -> None:
        def drop(st: State) -> State | None:
            if (st.lease or {}).get("token") != self.token:
                return None
            st.lease = {}
            return st

        try:
            self.backend._publish(self.registry.update_state(drop, reason="controller stopped", actor=self.owner))
        except MlopsError as e:  # an expiring lease is as good as a dropped one
            log.warning("rollout controller: could not drop its lease: %s", e.headline)

    def _renew(self, st: State, rid: str) -> None:
        cur = st.lease or {}
        if cur.get("token") == self.token and float(cur["expires_at"]) - time.time() > self.cfg.lease_ttl * 2 / 3:
            return
        self._write(rid, lambda s: s, reason="controller lease heartbeat", actor=self.owner)

    # ------------------------------------------------------------------ stats and traffic

    def _stats(self, since: float) -> dict[str, Any]:
        import httpx

        from mlops.rollout import _headers

        params: dict[str, Any] = {"since": since}
        if self.model_param:
            params["model"] = self.model_param
        r = httpx.get(
            f"{self.base_url}/v1/mlops/stats",
            params=params,
            headers=_headers(self.api_key),
            timeout=10,
            trust_env=False,
        )
        r.raise_for_status()
        return dict(r.json().get("releases", {}))

    def _send(self, rec: dict[str, Any], n: int, offset: int) -> None:
        """Replayed eval prompts as `n` distinct users (the CI job's part when it returned at once)."""
        if self._prompts is None:
            self._prompts = canary_prompts(self.backend.loaded)
        model_cfg = self.backend.cfg.models[self.model]
        seed = abs(hash(rec["id"])) % 1000
        asyncio.run(
            _drive(self.base_url, self._prompts, n, model_cfg.max_tokens, 16, self.model, seed, self.api_key, offset)
        )

    # ------------------------------------------------------------------ canary

    def _orphaned(self, st: State, rec: dict[str, Any]) -> str | None:
        """A canary its CI job drives: left alone while the job's lease lives; aborted once it expired."""
        lease = st.lease or {}
        if live(lease):
            return None
        who = lease.get("owner") or rec.get("started_by")
        why = f"its driver {who} stopped renewing the rollout lease: canary aborted, all traffic back to production"

        def abort(s: State) -> State:
            rollouts.finish(s, "aborted", why, "controller")
            recover_routing(s)
            return s

        if self._write(rec["id"], abort, reason=why, actor="controller") is None:
            return None
        self.backend.record(rec["release"], "aborted", by="controller", reason=why, rollout=rec["id"])
        rollouts.settle(self.registry)
        return f"aborted rollout {rec['id']}: {why}"

    def _apply(self, rec: dict[str, Any], i: int, verdict: StepVerdict | None, base: dict[str, float]) -> str:
        """Set step `i`'s weights (recording the previous step's verdict), then send its replay traffic."""
        pct = int(rec["steps"][i])
        prod, release = rec["baseline"], rec["release"]

        def change(st: State) -> State:
            now = time.time()
            r = st.rollout
            r.update(step=i, applied=i, step_started_at=now, due_at=now + float(rec["bake"]), extensions=0)
            if verdict is not None:
                r["verdicts"] = [*r.get("verdicts", []), verdict.to_json()]
            if base:
                r["baseline_stats"] = base
            st.stages["canary"] = release
            st.routing = _weights(prod, release, pct)
            st.shadow = {}
            return st

        new = self._write(rec["id"], change, reason=f"canary step {i + 1}: {pct}% (controller)", actor="controller")
        if new is None:
            return "record ended meanwhile"
        wait_served(self.base_url, new.version)
        self._since[(rec["id"], i)] = time.time()
        if rec.get("traffic") == "replay":
            self._send(rec, int(self.cfg.requests_per_step), i * int(self.cfg.requests_per_step))
        return f"canary step {i + 1}: {pct}% of traffic to {release}"

    def _canary(self, st: State, rec: dict[str, Any], now: float) -> str | None:
        i = int(rec.get("step", 0))
        if int(rec.get("applied", i)) != i:
            return self._apply(rec, i, None, {})
        if now < float(rec.get("due_at", rec["step_started_at"])):
            self._renew(st, rec["id"])
            return None
        pct = int(rec["steps"][i])
        release, prod = rec["release"], rec["baseline"]
        since = self._since.get((rec["id"], i), float(rec["step_started_at"]))
        doc = self._stats(since)
        cand = doc.get(release, {"requests": 0})
        prod_now = doc.get(prod, {})
        base: dict[str, float] = dict(rec.get("baseline_stats") or {})
        if prod_now.get("requests", 0) - prod_now.get("errors", 0) >= MIN_LATENCY_SAMPLES or not base:
            ref, base = prod_now, dict(prod_now)
        else:  # at 100% production has no traffic: compare with what it showed last
            ref = base
        n = int(cand.get("requests", 0))
        live_only = rec.get("traffic") == "live"
        need = self.cfg.min_requests if live_only else max(1, math.ceil(self.cfg.requests_per_step * pct / 100))
        if n < need and int(rec.get("extensions", 0)) < self.cfg.max_extensions:
            return self._extend(rec, i, n, need)
        v = self.judge(i + 1, pct, cand, ref, self.cfg, "canary")
        v.decided_by = "controller:analysis"
        if n < need and v.passed:
            v.passed = False
            v.reasons.append(
                f"too little traffic: {n} candidate requests < {need} after {rec.get('extensions')} extensions"
            )
        self.backend.record(release, "canary_step", by=v.decided_by, rollout=rec["id"], **v.to_json())
        if not v.passed:
            return self._rolled_back(rec, v)
        if i + 1 < len(rec["steps"]):
            return self._apply(rec, i + 1, v, base)
        return self._promote(rec, v, base)

    def _extend(self, rec: dict[str, Any], i: int, n: int, need: int) -> str:
        extra = max(float(rec["bake"]), float(self.cfg.interval))

        def change(st: State) -> State:
            r = st.rollout
            r["extensions"] = int(r.get("extensions", 0)) + 1
            r["due_at"] = time.time() + extra
            return st

        if self._write(
            rec["id"], change, reason=f"canary step {i + 1} extended: {n}/{need} requests", actor="controller"
        ):
            if rec.get("traffic") == "replay":  # top up: the stable hash may have given this step few
                self._send(rec, int(self.cfg.requests_per_step), (i + 1) * 1000 + int(rec.get("extensions", 0)) * 100)
        return f"canary step {i + 1} extended: {n} of {need} candidate requests"

    def _rolled_back(self, rec: dict[str, Any], v: StepVerdict) -> str:
        why = "; ".join(v.reasons)

        def change(st: State) -> State:
            st.rollout["verdicts"] = [*st.rollout.get("verdicts", []), v.to_json()]
            rollouts.finish(st, "rolled_back", f"canary failed at {v.percent}%: {why}", "controller:analysis")
            recover_routing(st)
            return st

        if self._write(rec["id"], change, reason=f"canary failed: {why}", actor="controller:analysis") is None:
            return "record ended meanwhile"
        self.backend.record(
            rec["release"], "rolled_back", by="controller:analysis", reasons=v.reasons, rollout=rec["id"]
        )
        rollouts.settle(self.registry)
        return f"rolled back {rec['release']} at {v.percent}%: {why}"

    def _promote(self, rec: dict[str, Any], v: StepVerdict, base: dict[str, float]) -> str:
        from mlops.rollout import _make_production

        reason = "canary passed (controller)"

        def change(st: State) -> State:
            r = st.rollout
            r["verdicts"] = [*r.get("verdicts", []), v.to_json()]
            r["baseline_stats"] = base
            rollouts.promoted(st, rec["release"], "controller:analysis", reason)
            return _make_production(st, rec["release"])

        if self._write(rec["id"], change, reason=reason, actor="controller:analysis") is None:
            return "record ended meanwhile"
        self.backend.record(rec["release"], "promoted", by="controller:analysis", reason=reason, rollout=rec["id"])
        rollouts.settle(self.registry)
        return f"promoted {rec['release']}"

    # ------------------------------------------------------------------ guardrail

    def _guard(self, rec: dict[str, Any], now: float) -> str | None:
        """Production's live window during `bake_after_promote`: an SLO breach rolls back."""
        release, rid = rec["release"], rec["id"]
        promoted_at = float(rec.get("promoted_at", now))
        if now >= promoted_at + float(rec.get("bake_after_promote", 0)):
            return self._guard_passed(rec)
        since = self._checkpoint.setdefault(rid, promoted_at)
        if now - since < float(self.cfg.interval):
            return None
        cur = self._stats(since).get(release, {"requests": 0})
        if int(cur.get("requests", 0)) < self.cfg.min_requests:
            return None  # the window grows until it holds enough requests
        v = self.judge(0, 100, cur, dict(rec.get("baseline_stats") or {}), self.cfg, "guardrail")
        v.decided_by = "controller:guardrail"
        if v.passed:
            self._checkpoint[rid] = now
            return None
        return self._guard_rollback(rec, v)

    def _guard_passed(self, rec: dict[str, Any]) -> str:
        why = f"guardrail bake of {float(rec['bake_after_promote']):g}s passed"
        self.registry.update_state(
            lambda st: st if rollouts.finish(st, "promoted", why, "controller:guardrail") else None,
            reason=why,
            actor="controller:guardrail",
        )
        self.backend.record(rec["release"], "guardrail_passed", by="controller:guardrail", rollout=rec["id"])
        rollouts.settle(self.registry)
        return f"{rec['release']}: {why}"

    def _guard_rollback(self, rec: dict[str, Any], v: StepVerdict) -> str:
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

        st = self.registry.update_state(change, reason=f"guardrail: {why}", actor="controller:guardrail")
        self.backend._publish(st)
        if not ok[0]:
            return "record ended meanwhile"
        self.backend.record(
            rec["release"], "rolled_back", by="controller:guardrail", reasons=v.reasons, rollout=rec["id"]
        )
        self.backend.record(back, "rolled_back_to", by="controller:guardrail", reason=f"guardrail: {why}")
        rollouts.settle(self.registry)
        return f"guardrail rolled back {rec['release']} to {back}: {why}"


def for_models(loaded: Loaded, base_url: str, names: list[str] | None = None) -> list[Controller]:
    """One controller per deployed model (`names`: default all), judging through the server at
    `base_url` (`?model=NAME` when it serves several). Not started."""
    from mlops.flows.session import Session
    from mlops.util import api_key_from_env

    names = names or loaded.cfg.deploy.names
    key = api_key_from_env(loaded.cfg.deploy.server.api_key_env)
    out = []
    for name in names:
        s = Session.open(loaded, model=name)
        out.append(Controller(s.backend, base_url, key, model_param=name if len(names) > 1 else None))
    return out


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
    if int(rec.get("applied", i)) != i:
        return f"{head}: waiting for a rollout controller to set step {i + 1} ({steps[i]}%): is `mlops serve` running?"
    due = float(rec.get("due_at", rec.get("step_started_at", t))) - t
    judged = f"judged in {due:.0f}s" if due > 0 else "being judged"
    ext = f", extended {rec['extensions']}x" if rec.get("extensions") else ""
    lease = st.lease or {}
    who = f"; lease {lease.get('owner')}" if live(lease, t) else "; no live lease"
    return f"{head}: step {i + 1}/{len(steps)} ({steps[i]}%), {judged}{ext}; driver {rec.get('driver')}{who}"
