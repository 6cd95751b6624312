"""Canary rollout with live analysis, promotion, and rollback: every decision is recorded.

At each declared step the candidate gets that share of traffic (stable hash of the request key),
the step's traffic is sent (locally the pipeline replays eval inputs as users), and the gateway's
per-release live stats over exactly that window decide: the candidate's error rate, and its p95
latency against production's. A failing step rolls back with one compare-and-swap of the state.

With `deploy.rollout.shadow` > 0 a shadow step comes first: production answers everything while
that share of its requests is mirrored to the candidate; the candidate's errors and latency on the
mirrored requests are judged the same way, and how often both outputs agree is recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from mlops.backends.base import Backend
from mlops.config import RolloutCfg
from mlops.configmonitor import NOT_CAPTURED
from mlops.contracts import StepVerdict
from mlops.errors import InfraError, UsageError
from mlops.registry.releases import Registry, State
from mlops.rollout_judge import MIN_LATENCY_SAMPLES, analyse, seen, shadow_verdict

Say = Callable[[str], None]
# What a canary request asks: a completion prompt, or a chat case's turns (OpenAI message dicts)
Prompt = str | list[dict[str, Any]]

SHADOW_SETTLE_S = 30.0  # how long the analysis waits for mirrored requests still running
TOP_UP_LIMIT = 4  # a step sends at most this many times `requests_per_step`


def mirror(st: State, release: str, share: float) -> State:
    """All user traffic on production, `share` of it mirrored to `release` (in the caller's write)."""
    prod = st.stages.get("production")
    st.stages["canary"] = release
    st.routing = {prod: 100} if prod else {}
    st.shadow = {"release": release, "share": share}
    return st


def _make_production(st: State, release: str) -> State:
    """`release` takes all traffic; the old production becomes `previous` (kept loaded for rollback)."""
    old = st.stages.get("production")
    if old and old != release:
        st.stages["previous"] = old
    st.stages["production"] = release
    st.stages["candidate"] = None
    st.stages["canary"] = None
    st.routing = {release: 100}
    st.shadow = {}
    return st


def promote(backend: Backend, release: str, reason: str, actor: str = "pipeline") -> State:
    """`release` becomes production; its rollout record (if one runs) enters its guardrail bake or
    finishes, in the same write."""
    from mlops.registry import rollouts

    def change(st: State) -> State:
        rollouts.promoted(st, release, actor, reason)
        return _make_production(st, release)

    state = backend.set_state(change, reason=reason, actor=actor)
    backend.record(release, "promoted", by=actor, reason=reason)
    rollouts.settle(backend.registry)
    return state


def abort_canary(backend: Backend, reason: str, actor: str = "pipeline", status: str = "rolled_back") -> State:
    """Send all traffic back to production (one write, which also finishes a running rollout record
    with `status`); the candidate keeps its manifest."""
    from mlops.registry import rollouts

    def change(st: State) -> State | None:
        prod = st.stages.get("production")
        if rollouts.finish(st, status, reason, actor) is not None:
            st.stages["canary"] = None
            st.routing = {prod: 100} if prod else {}
            st.shadow = {}
            return st
        if st.stages.get("canary") is None and st.routing == ({prod: 100} if prod else {}) and not st.shadow:
            return None
        st.stages["canary"] = None
        st.routing = {prod: 100} if prod else {}
        st.shadow = {}
        return st

    state = backend.set_state(change, reason=reason, actor=actor)
    rollouts.settle(backend.registry)
    return state


def rollback(backend: Backend, to: str | None, reason: str, actor: str) -> tuple[State, str]:
    """Route everything to `to` (default: the previous production) after proving it loads.

    The preflight (artifact present, sha256 as in the manifest, the model loads) runs before any
    pointer moves: a release that fails it is refused (exit 4) and production keeps serving."""
    reg: Registry = backend.registry
    state, _ = reg.read_state()
    target = to or state.stages.get("previous")
    if not target:
        raise UsageError("nothing to roll back to: no previous production release (pass --to RELEASE)")
    reg.require(target)
    backend.preflight(target)  # IntegrityError / InfraError (exit 4) before any pointer moves

    from mlops.registry import rollouts
    from mlops.registry.lease import preempt

    dropped: dict[str, Any] = {}
    canary_of: list[str | None] = [None]

    def change(st: State) -> State:
        # an operator never waits for a pipeline: the lease goes in the same write that moves
        # production, and a running rollout (canary or guardrail bake) ends there too: its
        # controller sees the record aborted and stops
        dropped.clear()
        dropped.update(preempt(st) or {})
        canary_of[0] = st.stages.get("canary") or st.stages.get("candidate")
        rollouts.finish(st, "aborted", f"pre-empted by {actor}: {reason}", actor)
        return _make_production(st, target)

    new = backend.set_state(change, reason=reason, actor=actor)
    rollouts.settle(reg)
    backend.record(target, "rolled_back_to", by=actor, reason=reason)
    if dropped and canary_of[0] and canary_of[0] != target:
        backend.record(canary_of[0], "preempted", by=actor, reason=reason, lease_owner=dropped.get("owner"))
    return new, target


def _headers(api_key: str | None) -> dict[str, str]:
    return {**NOT_CAPTURED, **({"authorization": f"Bearer {api_key}"} if api_key else {})}


async def _drive(
    base_url: str,
    prompts: Sequence[Prompt],
    n: int,
    max_tokens: int,
    concurrency: int,
    model: str,
    seed: int,
    api_key: str | None = None,
    offset: int = 0,
) -> None:
    """Send `n` requests as `n` distinct users (so the stable hash spreads them by weight)."""
    import asyncio  # here, not at the top: `mlops rollback` (one state write) never needs it

    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        prompt = prompts[(offset + i) % len(prompts)]
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "user": f"canary-{seed}-{offset + i}",
        }
        if isinstance(prompt, str):
            body["prompt"], path = prompt, "/v1/completions"
        else:  # a chat case's turns: the chat route, as the eval harness sends them
            body["messages"], path = prompt, "/v1/chat/completions"
        async with sem:
            try:
                await client.post(f"{base_url}{path}", json=body, timeout=60)
            except httpx.HTTPError:
                pass  # the server's own stats count what went wrong

    async with httpx.AsyncClient(trust_env=False, headers=_headers(api_key)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))


def read_stats(base_url: str, since: float, api_key: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The server's live stats since `since` (`model`: ?model=NAME on a server with several)."""
    import httpx

    params: dict[str, Any] = {"since": since, **({"model": model} if model else {})}
    try:
        r = httpx.get(
            f"{base_url}/v1/mlops/stats",
            params=params,
            headers=_headers(api_key),
            timeout=10,
            trust_env=False,
        )
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise InfraError(f"cannot read live stats from {base_url}: {e}") from e
    return dict(r.json())


SERVED_WAIT_S = 60.0  # an S3-backed endpoint re-reads the state every second, and may load a model


def wait_served(base_url: str, version: int, timeout: float = SERVED_WAIT_S) -> None:
    """Until the endpoint reports (GET /health, `state_version`) that it serves state `version` or
    newer. An endpoint on S3 re-reads the state on a timer: traffic sent or a smoke request made
    before that is answered by the old routing. An endpoint whose /health has no version is not waited on."""
    import httpx

    deadline = time.monotonic() + timeout
    seen: object = None
    while True:
        try:
            doc = httpx.get(f"{base_url}/health", timeout=5, trust_env=False).json()
            seen = doc.get("state_version") if isinstance(doc, dict) else None
            if seen is None and isinstance(doc, dict):
                return
        except (httpx.HTTPError, ValueError):
            seen = "unreachable"
        if isinstance(seen, int) and seen >= version:
            return
        if time.monotonic() > deadline:
            raise InfraError(
                f"endpoint {base_url} still serves state v{seen} {timeout:.0f}s after v{version} was written"
            )
        time.sleep(0.05)


def stats_since(base_url: str, since: float, api_key: str | None = None) -> dict[str, dict[str, float]]:
    return dict(read_stats(base_url, since, api_key)["releases"])


def settled(base_url: str, since: float, api_key: str | None, model: str | None = None) -> dict[str, Any]:
    """Stats once every mirrored request has been recorded (bounded wait)."""
    deadline = time.monotonic() + SHADOW_SETTLE_S
    while True:
        doc = read_stats(base_url, since, api_key, model)
        if doc.get("shadow_pending", 0) <= 0 or time.monotonic() > deadline:
            return doc
        time.sleep(0.02)


def canary(
    backend: Backend,
    release: str,
    base_url: str,
    prompts: Sequence[Prompt],
    cfg: RolloutCfg,
    model: str,
    max_tokens: int,
    say: Say,
    drive_traffic: bool = True,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    concurrency: int = 16,
) -> list[StepVerdict]:
    """Walk the steps; stop at the first failing one. Returns the verdicts (last one failing or all
    passing); each is appended to the candidate's history with its metric values."""
    from mlops.registry.lease import bake

    reg = backend.registry
    key = backend.client_key()
    prod = reg.read_state()[0].stages.get("production")
    assert prod is not None and prod != release
    verdicts: list[StepVerdict] = []
    baseline: dict[str, float] = {}  # production's stats from the last step where it had traffic

    def drive(i: int, since: float, share: float, got: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
        """Send the step's requests, then top up (bounded) until the candidate has had its share
        of them: with few requests the stable hash may give a 10% step no candidate traffic."""
        n = cfg.requests_per_step
        want = max(1, math.ceil(n * share))
        sent, batch = 0, n
        while True:
            if drive_traffic:
                import asyncio

                traffic = _drive(base_url, prompts, batch, max_tokens, concurrency, model, seed * 1000 + i, key, sent)
                asyncio.run(traffic)
            sent += batch
            doc = settled(base_url, since, key)
            have = got(doc)
            if not drive_traffic or have >= want or sent >= TOP_UP_LIMIT * n:
                return doc
            batch = min(n, math.ceil((want - have) / share) + 1)

    def record(v: StepVerdict) -> None:
        verdicts.append(v)
        backend.record(release, "canary_step", by=v.decided_by, **v.to_json())
        c = v.candidate
        what = f"shadow {cfg.shadow:.0%}" if v.mode == "shadow" else f"canary {v.percent:>3}%"
        extra = f", agree {v.extra['agreement']:.0%}" if v.mode == "shadow" else ""
        say(
            f"{what}: candidate {int(c.get('requests', 0))} req, errors {c.get('error_rate', 0):.1%}, "
            f"p95 {c.get('p95', 0) * 1000:.1f} ms vs production {v.production.get('p95', 0) * 1000:.1f} ms{extra} -> "
            + ("pass" if v.passed else "FAIL: " + "; ".join(v.reasons))
        )

    if cfg.shadow > 0:

        def to_shadow(st: State) -> State:
            rec = st.rollout
            if rec.get("status") == "running" and rec.get("release") == release:  # the job drives it
                rec.update(phase="shadow", shadow=cfg.shadow, shadow_started_at=time.time())
            return mirror(st, release, cfg.shadow)

        st = backend.set_state(
            to_shadow, reason=f"shadow: mirror {cfg.shadow:.0%} of traffic to {release}", actor="pipeline"
        )
        wait_served(base_url, st.version)
        since = time.time()
        doc = drive(-1, since, cfg.shadow, lambda d: int(seen(d, release).get("mirrored", 0)))
        baseline = doc.get("releases", {}).get(prod, {})
        record(shadow_verdict(doc, release, cfg, cfg.shadow))
        if not verdicts[-1].passed:
            return verdicts

    for i, pct in enumerate(cfg.steps):
        if on_step is not None:
            on_step(i)

        def change(st: State, pct: int = pct, i: int = i) -> State:
            st.stages["canary"] = release
            st.routing = {prod: 100 - pct, release: pct} if pct < 100 else {release: 100}
            st.shadow = {}
            rec = st.rollout
            if rec.get("status") == "running" and rec.get("release") == release:  # the job drives it
                rec.update(step=i, applied=i, phase="canary", step_started_at=time.time())
                rec["verdicts"] = [v.to_json() for v in verdicts]
            return st

        st = backend.set_state(change, reason=f"canary step {i + 1}: {pct}%", actor="pipeline")
        wait_served(base_url, st.version)
        since = time.time()
        doc = drive(i, since, pct / 100, lambda d: int(d["releases"].get(release, {}).get("requests", 0)))
        if cfg.bake > 0 and pct < 100:
            bake(backend.registry, cfg.bake)  # real traffic accumulates meanwhile; a pre-emption wakes it
            doc = read_stats(base_url, since, key)
        live = doc["releases"]
        prod_now = live.get(prod, {})
        if prod_now.get("requests", 0) - prod_now.get("errors", 0) >= MIN_LATENCY_SAMPLES or not baseline:
            ref, older = prod_now, False
            baseline = prod_now
        else:  # at 100% (or a thin step) production's latency is the one it showed last
            ref, older = baseline, True
        v = analyse(i + 1, pct, live.get(release, {"requests": 0}), ref, cfg)
        if older:
            v.notes.append("production compared at its last step with enough traffic")
        record(v)
        if not v.passed:
            break
    return verdicts


def kill_hook_from_env() -> Callable[[str], None] | None:
    """Testing hook: with MLOPS_TEST_KILL_AT=<step> (train, registered, served, evaluated, canary-0,
    canary-1, ..., promote) `mlops run` SIGKILLs itself at that step boundary, so tests can prove
    that a rerun after a `kill -9` leaves routing and registry consistent; with
    MLOPS_TEST_KILL_AFTER=<seconds> it SIGKILLs itself that long after it starts, wherever it is."""
    import os
    import signal
    import threading

    after = os.environ.get("MLOPS_TEST_KILL_AFTER")
    if after:  # kill -9 at a random moment, not only at a boundary (a timer, armed once)
        timer = threading.Timer(float(after), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    at = os.environ.get("MLOPS_TEST_KILL_AT")
    if not at:
        return None

    def hook(name: str) -> None:
        if name == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
