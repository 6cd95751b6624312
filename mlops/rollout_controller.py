"""The rollout controller: advances a model's rollout record (`State.rollout`) on its own clock, so a
rollout outlives the CI job that started it.

`Controller.tick()` is one step of the state machine: read the record; when the current step's
bake is over, judge the step's window of live requests (the gateway's per-release stats since the
step began), then move to the next step, promote, roll back, or bake the step again when it saw too
little traffic; every move is one compare-and-swap that also holds (takes or renews) the rollout
lease. With `deploy.rollout.shadow` > 0 the record starts in phase `shadow`: mirrored traffic only,
judged before canary step 1 (mlops/rollout_shadow.py). After promotion, during `bake_after_promote`,
it judges production's live window every `interval` and rolls back on an SLO breach
(`controller:guardrail`).

Who runs it: on `backend: local` a child process of `mlops serve` (mlops/rollout_process.py: its
judging never holds the server's GIL), and a thread of the server `mlops run` starts for itself,
where it idles while the run holds the lease; on Modal a scheduled function
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

from mlops import rollout_shadow
from mlops.backends.base import Backend
from mlops.config import Loaded
from mlops.contracts import StepVerdict
from mlops.errors import MlopsError
from mlops.experiment_controller import ExperimentWatch
from mlops.registry import rollouts
from mlops.registry.lease import live, owner_name, recover_routing
from mlops.registry.releases import State
from mlops.rollout import TOP_UP_LIMIT, Prompt, _drive, read_stats, wait_served
from mlops.rollout_guard import guard, reference, save
from mlops.rollout_judge import MIN_LATENCY_SAMPLES, analyse

log = logging.getLogger("mlops.controller")


class _Busy(Exception):
    """Another writer holds a live rollout lease: this tick does nothing."""


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.registry = backend.registry
        self.cfg = backend.cfg.deploy.rollout
        self.model = backend.cfg.deploy.model
        self.base_url = base_url
        self.api_key = api_key
        self.model_param = model_param  # ?model=NAME on a server with several models
        self.clock = clock
        self.owner = owner_name("controller")
        import secrets

        self.token = secrets.token_hex(8)
        self._since: dict[tuple[str, int], float] = {}  # (rollout, step) -> when the server served it
        self._checkpoint: dict[str, float] = {}  # rollout -> start of production's next guardrail window
        self._baseline: dict[str, Any] = {}  # rollout -> production's side of its last full live window
        self._ref: dict[str, tuple[float, float]] = {}  # rollout -> that window, kept in the record
        self._metrics: list[Any] | None = None  # the live metrics (built once)
        self._readers: dict[str, Any] = {}  # rollout -> its WindowReader
        self._prompts: list[Prompt] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: str | None = None  # what the last tick did (for tests and `mlops status`)
        self.seen: State | None = None  # the state the last tick read
        # `mlops experiment start --auto-stop`: stopped at its verdict (mlops/experiment_controller.py)
        self.experiments = ExperimentWatch(backend, float(self.cfg.interval), clock)

    # ------------------------------------------------------------------ the loop

    def start(self) -> Controller:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"rollout-controller-{self.model}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        try:
            save(self)
        except MlopsError as e:  # the next controller judges from promotion: more, not less
            log.warning("rollout controller: could not save its guardrail checkpoint: %s", e.headline)
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
        self.seen = st
        rec = st.rollout
        if not rec:  # (a rollout and an experiment exclude each other)
            return self.experiments.tick(st)
        if rec.get("status") != rollouts.RUNNING:
            done = rollouts.settle(self.registry)
            return f"archived rollout {done['id']} ({done['status']})" if done else None
        now = self.clock()
        try:
            if rec.get("phase") == "bake_after_promote":
                return guard(self, rec, now)
            if rec.get("driver") != "controller":
                return self._orphaned(st, rec)
            if rec.get("phase") == "shadow":  # mirrored traffic only, before canary step 1
                return rollout_shadow.step(self, st, rec, now)
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
        return dict(read_stats(self.base_url, since, self.api_key, self.model_param).get("releases", {}))

    def _send(self, rec: dict[str, Any], n: int, offset: int) -> None:
        """Replayed eval prompts as `n` distinct users (the CI job's part when it returned at once)."""
        if self._prompts is None:
            from mlops.rollout_start import canary_prompts

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
            r.update(step=i, applied=i, phase="canary", step_started_at=now, due_at=now + float(rec["bake"]))
            r["extensions"] = 0
            if verdict is not None:
                r["verdicts"] = [*r.get("verdicts", []), verdict.to_json()]
            if base:
                r["baseline_stats"] = base
            if rec["id"] in self._ref:
                r["baseline_window"] = list(self._ref[rec["id"]])
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
        due = float(rec.get("due_at", rec["step_started_at"]))
        live_only = rec.get("traffic") == "live"
        # a captured request reaches the store up to monitor.flush_interval after its answer
        if now < due + (self._flush_lag() if live_only else 0.0):
            self._renew(st, rec["id"])
            return None
        since = self._since.get((rec["id"], i), float(rec["step_started_at"]))
        v, base = self._judge_live(rec, i, since, due) if live_only else self._judge_replay(rec, i, since)
        v.decided_by = "controller:analysis"
        if v.outcome == "extend":
            return self._extend(rec, i, "; ".join(v.reasons))
        self.backend.record(rec["release"], "canary_step", by=v.decided_by, rollout=rec["id"], **v.to_json())
        if not v.passed:
            return self._rolled_back(rec, v)
        if i + 1 < len(rec["steps"]):
            return self._apply(rec, i + 1, v, base)
        return self._promote(rec, v, base)

    def _reader(self, rec: dict[str, Any]) -> Any:
        """The rollout's window reader: each capture file is parsed once, read every interval."""
        from mlops.rollout_analysis import WindowReader

        if rec["id"] not in self._readers:
            self._readers[rec["id"]] = WindowReader(self.registry, rec["release"], rec["baseline"])
        return self._readers[rec["id"]]

    def _flush_lag(self) -> float:
        return float(self.backend.cfg.monitor.flush_interval) + 0.2

    def _judge_replay(self, rec: dict[str, Any], i: int, since: float) -> tuple[StepVerdict, dict[str, float]]:
        """Replayed eval prompts are the traffic (today's canary): the server's counters of the step,
        which count mlops's own requests too; too few candidate requests: top up (bounded)."""
        pct = int(rec["steps"][i])
        doc = self._stats(since)
        cand = doc.get(rec["release"], {"requests": 0})
        prod_now = doc.get(rec["baseline"], {})
        base: dict[str, float] = dict(rec.get("baseline_stats") or {})
        if prod_now.get("requests", 0) - prod_now.get("errors", 0) >= MIN_LATENCY_SAMPLES or not base:
            ref, base = prod_now, dict(prod_now)
        else:  # at 100% production has no traffic: compare with what it showed last
            ref = base
        n, need = int(cand.get("requests", 0)), max(1, math.ceil(self.cfg.requests_per_step * pct / 100))
        if n < need and int(rec.get("extensions", 0)) < TOP_UP_LIMIT:
            v = StepVerdict(step=i + 1, percent=pct, candidate=cand, production=ref, passed=False, decision="extend")
            v.reasons = [f"{n} of {need} candidate requests"]
            return v, base
        return analyse(i + 1, pct, cand, ref, self.cfg, "canary"), base

    def _judge_live(
        self, rec: dict[str, Any], i: int, since: float, until: float
    ) -> tuple[StepVerdict, dict[str, float]]:
        """Live traffic only: the captured window of both releases (mlops/rollout_analysis.py)."""
        from mlops.rollout_analysis import judge_step, live_metrics, replay_window

        if self._metrics is None:
            self._metrics = live_metrics(self.backend.loaded)
        release, prod = rec["release"], rec["baseline"]
        pct = int(rec["steps"][i])
        w = self._reader(rec).read(since, until, self._stats(since))
        prev = reference(self, rec)
        v = judge_step(
            w, self.cfg, self._metrics, extensions=int(rec.get("extensions", 0)), step=i + 1, percent=pct, baseline=prev
        )
        if w.production.requests >= self.cfg.analysis.min_requests:
            self._baseline[rec["id"]], self._ref[rec["id"]] = w.production, (since, until)
        if v.outcome == "replay":  # still too little live traffic: both releases on eval prompts, pinned
            from mlops.rollout_start import canary_prompts

            model_cfg = self.backend.cfg.models[self.model]
            rw = replay_window(
                self.base_url,
                canary_prompts(self.backend.loaded),
                release,
                prod,
                self.cfg.analysis.replay_requests,
                model=self.model,
                max_tokens=model_cfg.max_tokens,
                api_key=self.api_key,
            )
            v = judge_step(rw, self.cfg, self._metrics, step=i + 1, percent=pct)
        base = dict(rec.get("baseline_stats") or {})
        if w.production.requests >= self.cfg.analysis.min_requests:
            base = w.production.summary()
        return v, base

    def _extend(self, rec: dict[str, Any], i: int, why: str) -> str:
        """Step `i` (-1: the shadow step) bakes again; replayed traffic is topped up."""
        extra = max(float(rec["bake"]), float(self.cfg.interval))
        what = "shadow step" if i < 0 else f"canary step {i + 1}"

        def change(st: State) -> State:
            r = st.rollout
            r["extensions"] = int(r.get("extensions", 0)) + 1
            r["due_at"] = time.time() + extra
            return st

        if self._write(rec["id"], change, reason=f"{what} extended: {why}", actor="controller"):
            if rec.get("traffic") == "replay":  # top up: the stable hash may have given this step few
                self._send(rec, int(self.cfg.requests_per_step), (i + 1) * 1000 + int(rec.get("extensions", 0)) * 100)
        return f"{what} extended: {why}"

    def _rolled_back(self, rec: dict[str, Any], v: StepVerdict) -> str:
        why = "; ".join(v.reasons)
        # a failed shadow step: the candidate never answered a user, only mirrored requests
        what = "aborted in shadow" if v.mode == "shadow" else f"canary failed at {v.percent}%"

        def change(st: State) -> State:
            st.rollout["verdicts"] = [*st.rollout.get("verdicts", []), v.to_json()]
            rollouts.finish(st, "rolled_back", f"{what}: {why}", "controller:analysis")
            recover_routing(st)
            return st

        if self._write(rec["id"], change, reason=f"{what}: {why}", actor="controller:analysis") is None:
            return "record ended meanwhile"
        self.backend.record(
            rec["release"], "rolled_back", by="controller:analysis", reasons=v.reasons, rollout=rec["id"]
        )
        rollouts.settle(self.registry)
        return f"rolled back {rec['release']} ({what}): {why}"

    def _promote(self, rec: dict[str, Any], v: StepVerdict, base: dict[str, float]) -> str:
        from mlops.rollout import _make_production

        reason = "canary passed (controller)"

        def change(st: State) -> State:
            r = st.rollout
            r["verdicts"] = [*r.get("verdicts", []), v.to_json()]
            r["baseline_stats"] = base
            if rec["id"] in self._ref:
                r["baseline_window"] = list(self._ref[rec["id"]])
            rollouts.promoted(st, rec["release"], "controller:analysis", reason)
            return _make_production(st, rec["release"])

        if self._write(rec["id"], change, reason=reason, actor="controller:analysis") is None:
            return "record ended meanwhile"
        self.backend.record(rec["release"], "promoted", by="controller:analysis", reason=reason, rollout=rec["id"])
        rollouts.settle(self.registry)
        return f"promoted {rec['release']}"


def for_models(loaded: Loaded, base_url: str, names: list[str] | None = None) -> list[Controller]:
    """One controller per deployed model (`names`: default all), judging through the server at
    `base_url` (`?model=NAME` when it serves several). Not started."""
    from mlops.flows.session import Session

    names = names or loaded.cfg.deploy.names
    out = []
    for name in names:
        s = Session.open(loaded, model=name)
        # the backend's key: on Modal the gateway's (MLOPS_API_KEY), locally deploy.server.api_key_env's
        key = s.backend.client_key()
        out.append(Controller(s.backend, base_url, key, model_param=name if len(names) > 1 else None))
    return out
