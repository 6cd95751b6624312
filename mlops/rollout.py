"""Canary rollout with live analysis, promotion, and rollback: every decision is recorded.

At each declared step the candidate gets that share of traffic (stable hash of the request key),
the step's traffic is sent (locally the pipeline replays eval inputs as users), and the gateway's
per-release live stats over exactly that window decide: candidate error rate and p95 latency
against production's. A failing step rolls back with one compare-and-swap of the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlops.backends.base import Backend
from mlops.config import RolloutCfg
from mlops.errors import InfraError
from mlops.registry.releases import Registry, State

Say = Callable[[str], None]


@dataclass
class StepVerdict:
    step: int
    percent: int
    candidate: dict[str, float]
    production: dict[str, float]
    passed: bool
    reasons: list[str] = field(default_factory=list)
    decided_by: str = "pipeline:analysis"

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "percent": self.percent, "candidate": self.candidate, "production": self.production,
            "passed": self.passed, "reasons": self.reasons, "decided_by": self.decided_by,
        }


def analyse(step: int, pct: int, cand: dict[str, float], prod: dict[str, float], cfg: RolloutCfg) -> StepVerdict:
    reasons = []
    if cand.get("requests", 0) == 0:
        reasons.append("candidate received no traffic in this step")
    if cand.get("error_rate", 0.0) > cfg.max_error_rate:
        reasons.append(f"error rate {cand['error_rate']:.1%} > {cfg.max_error_rate:.1%}")
    p95c, p95p = cand.get("p95", 0.0), prod.get("p95", 0.0)
    if p95p > 0 and p95c > cfg.max_p95_ratio * p95p and p95c - p95p > 0.005:
        reasons.append(f"p95 {p95c * 1000:.1f} ms > {cfg.max_p95_ratio:g} x production's {p95p * 1000:.1f} ms")
    return StepVerdict(step, pct, cand, prod, not reasons, reasons)


def promote(backend: Backend, release: str, reason: str, actor: str = "pipeline") -> State:
    def change(st: State) -> State:
        old = st.stages.get("production")
        if old and old != release:
            st.stages["previous"] = old
        st.stages["production"] = release
        st.stages["candidate"] = None
        st.stages["canary"] = None
        st.routing = {release: 100}
        st.shadow = {}
        return st

    state = backend.set_state(change, reason=reason, actor=actor)
    backend.registry.append_event(release, "promoted", by=actor, reason=reason)
    return state


def abort_canary(backend: Backend, reason: str, actor: str = "pipeline") -> State:
    """Send all traffic back to production (one write); the candidate keeps its manifest."""

    def change(st: State) -> State | None:
        prod = st.stages.get("production")
        if st.stages.get("canary") is None and st.routing == ({prod: 100} if prod else {}) and not st.shadow:
            return None
        st.stages["canary"] = None
        st.routing = {prod: 100} if prod else {}
        st.shadow = {}
        return st

    return backend.set_state(change, reason=reason, actor=actor)


def rollback(backend: Backend, to: str | None, reason: str, actor: str) -> tuple[State, str]:
    """Route everything to `to` (default: the previous production) after proving it loads."""
    reg: Registry = backend.registry
    state, _ = reg.read_state()
    target = to or state.stages.get("previous")
    if not target:
        from mlops.errors import UsageError

        raise UsageError("nothing to roll back to: no previous production release (pass --to RELEASE)")
    reg.require(target)
    backend.preflight(target)  # IntegrityError / InfraError (exit 4) before any pointer moves

    def change(st: State) -> State:
        old = st.stages.get("production")
        if old and old != target:
            st.stages["previous"] = old
        st.stages["production"] = target
        st.stages["canary"] = None
        st.stages["candidate"] = None
        st.routing = {target: 100}
        st.shadow = {}
        return st

    new = backend.set_state(change, reason=reason, actor=actor)
    reg.append_event(target, "rolled_back_to", by=actor, reason=reason)
    return new, target


async def _drive(base_url: str, prompts: list[str], n: int, max_tokens: int, concurrency: int, model: str, seed: int) -> None:
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0, "user": f"canary-{seed}-{i}"}
        async with sem:
            try:
                await client.post(f"{base_url}/v1/completions", json=body, timeout=30)
            except httpx.HTTPError:
                pass  # the server's own stats count what went wrong

    async with httpx.AsyncClient(trust_env=False) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))


def stats_since(base_url: str, since: float) -> dict[str, dict[str, float]]:
    import httpx

    try:
        r = httpx.get(f"{base_url}/v1/mlops/stats", params={"since": since}, timeout=10, trust_env=False)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise InfraError(f"cannot read live stats from {base_url}: {e}") from e
    return dict(r.json()["releases"])


def canary(
    backend: Backend,
    release: str,
    base_url: str,
    prompts: list[str],
    cfg: RolloutCfg,
    model: str,
    max_tokens: int,
    say: Say,
    drive_traffic: bool = True,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[StepVerdict]:
    """Walk the steps; stop at the first failing one. Returns the verdicts (last one failing or all passing)."""
    reg = backend.registry
    prod = reg.read_state()[0].stages.get("production")
    assert prod is not None and prod != release
    verdicts: list[StepVerdict] = []
    for i, pct in enumerate(cfg.steps):
        if on_step is not None:
            on_step(i)

        def change(st: State, pct: int = pct) -> State:
            st.stages["canary"] = release
            st.routing = {prod: 100 - pct, release: pct} if pct < 100 else {release: 100}
            if cfg.shadow > 0 and pct < 100:
                st.shadow = {"release": release, "share": cfg.shadow}
            return st

        backend.set_state(change, reason=f"canary step {i + 1}: {pct}%", actor="pipeline")
        since = time.time()
        if drive_traffic:
            asyncio.run(_drive(base_url, prompts, cfg.requests_per_step, max_tokens, 16, model, seed * 1000 + i))
        if cfg.bake > 0 and pct < 100:
            time.sleep(cfg.bake)  # declared bake: real traffic accumulates in the window meanwhile
        live = stats_since(base_url, since)
        v = analyse(i + 1, pct, live.get(release, {"requests": 0}), live.get(prod, {}), cfg)
        verdicts.append(v)
        reg.append_event(release, "canary_step", by=v.decided_by, **v.to_json())
        cand = v.candidate
        say(
            f"canary {pct:>3}%: candidate {int(cand.get('requests', 0))} req, errors {cand.get('error_rate', 0):.1%}, "
            f"p95 {cand.get('p95', 0) * 1000:.1f} ms vs production {v.production.get('p95', 0) * 1000:.1f} ms -> "
            + ("pass" if v.passed else "FAIL: " + "; ".join(v.reasons))
        )
        if not v.passed:
            break
    return verdicts
