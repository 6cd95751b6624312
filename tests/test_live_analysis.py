"""The live analysis on real traffic: a real server (the app `mlops serve` runs, with its capture
middleware, under uvicorn on 127.0.0.1) routes half of its users to a candidate, a real HTTP client
sends the requests, and the judge reads the capture records the server wrote to the store.

- a candidate that fails 5% of its requests (the server's fault-injection hook) fails the step on
  the comparison with production alone (the absolute ceiling is set above 5% here);
- a clean candidate on the same kind of traffic passes;
- too little traffic extends the step, then fails it, or asks for a replay that is judged on eval
  prompts pinned to each release (mlops's own requests: never in the capture);
- an SLO breach in the same records is named by check_slo.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import make_project, train_and_publish, wait_for

from mlops.config import Loaded, load
from mlops.configmonitor import NOT_CAPTURED
from mlops.monitor.capture import CaptureMiddleware, wrap
from mlops.pipeline import Session
from mlops.registry.releases import State
from mlops.rollout_analysis import check_slo, judge_step, live_metrics, read_window, replay_window
from mlops.serving.faults import Fault
from mlops.serving.runner import build, start_server
from mlops.serving.server import create_app

OVERRIDES = {
    "models": {"tiny": {"max_tokens": 6}},
    "evals": {
        "heldout": {"metrics": ["exact_match", "latency", "json_valid", {"name": "regex", "pattern": "^[a-z]*$"}]}
    },
    "monitor": {"flush_interval": 0.1},  # records reach the store a tenth of a second after their request
    "deploy": {
        "rollout": {
            "max_error_rate": 0.1,  # above the planted 5%: only the comparison with production can fail it
            "max_p95_ratio": 5.0,  # latency on a loaded 2-core machine is not the subject here (unit tests)
            "analysis": {"alpha": 0.05, "min_requests": 50, "min_samples": 30, "metrics": ["json_valid", "regex"]},
            "guardrails": {"max_error_rate": 0.02, "min_requests": 50},
        }
    },
}
PATTERN = "^zq"  # the traffic pattern the candidate fails on (MLOPS_FAULT_PATTERN)
USERS = 400  # ~200 a side at 50/50: 5% is ~10 errors against none, p ~ 0.001 < alpha / 8


@dataclass
class Live:
    loaded: Loaded
    url: str
    prod: str
    cand: str
    opts: Any  # ServerOptions: its `fault` is set per test
    capture: CaptureMiddleware

    def settled(self) -> None:
        """Until the capture writer has written everything it was handed (bounded)."""
        w = self.capture.writer
        wait_for(lambda: w.q.empty() and w.written + w.failed_writes + w.encode_errors == w.submitted, "capture")


def inputs(n: int, seed: int, pattern_every: int = 0) -> list[str]:
    """Lowercase words as the example is asked; with `pattern_every`, every such input starts "zq"."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10))) for _ in range(n)]
    return [("zq" + w if pattern_every and i % pattern_every == 0 else w) + "=" for i, w in enumerate(words)]


def send(url: str, prompts: list[str], tag: str, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """Each prompt as its own user (the stable hash spreads users by the routing weights)."""

    async def main() -> list[httpx.Response]:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=60, trust_env=False, headers=headers or {}) as c:

            async def one(i: int, p: str) -> httpx.Response:
                async with sem:
                    body = {"model": "tiny", "prompt": p, "max_tokens": 6, "user": f"{tag}-{i}"}
                    return await c.post(f"{url}/v1/completions", json=body)

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = make_project(tmp_path_factory.mktemp("live"), OVERRIDES)
    prod = train_and_publish(root, seed=0, steps=20)  # what they answer is not what is judged here
    cand = train_and_publish(root, seed=1, steps=20, promote=False)
    loaded = load(root / "mlops.yaml")
    s = Session.open(loaded)

    def split(st: State) -> State:
        st.stages["canary"] = cand
        st.routing = {prod: 50, cand: 50}
        return st

    s.backend.set_state(split, reason="test: canary at 50%", actor="test")
    pool, opts = build(loaded, s.registry)
    pool.start()
    app = wrap(create_app(pool, opts), loaded, s.registry.store)
    assert isinstance(app, CaptureMiddleware)
    try:
        with start_server(app) as url:
            yield Live(loaded, url, prod, cand, opts, app)
    finally:
        app.writer.close()
        pool.close()


@contextlib.contextmanager
def window_of(live: Live) -> Iterator[list[float]]:
    """[since, until] around the body's requests (until set on exit, once capture has written them)."""
    span = [time.time()]
    yield span
    live.settled()
    span.append(time.time())


def test_a_candidate_failing_5_percent_fails_on_the_comparison_with_production(live: Live) -> None:
    live.opts.fault = Fault(live.cand, 0.2, pattern=PATTERN)
    with window_of(live) as span:
        users = send(live.url, inputs(USERS, seed=1, pattern_every=4), "bad")
        own = send(live.url, inputs(40, seed=2), "own", NOT_CAPTURED)  # mlops's own: not judged
    live.opts.fault = None
    assert all(r.status_code in (200, 500) for r in users + own)
    w = read_window(Session.open(live.loaded).registry, live.cand, live.prod, span[0], span[1])
    assert w.candidate.requests + w.production.requests == USERS  # the 40 own requests are not there
    by = {rel: sum(1 for r in users if r.headers["x-mlops-release"] == rel) for rel in (live.cand, live.prod)}
    assert (w.candidate.requests, w.production.requests) == (by[live.cand], by[live.prod])
    assert w.candidate.errors == sum(1 for r in users if r.status_code == 500) > 0 and w.production.errors == 0
    assert 0.03 < w.candidate.error_rate < 0.07  # 5% of its requests, all on the pattern

    cfg = live.loaded.cfg.deploy.rollout
    v = judge_step(w, cfg, live_metrics(live.loaded), step=2, percent=50)
    checks = {c["name"]: c for c in v.checks}
    assert v.decision == "fail" and checks["error_rate"]["status"] == "fail", v.checks
    assert "max_error_rate" not in checks["error_rate"]["why"]  # the z-test failed it, not the ceiling
    assert checks["metric.json_valid"]["status"] == checks["metric.regex"]["status"] == "pass"
    assert checks["latency"]["status"] == "pass"
    # the same records breach the guardrail SLO (2% errors): the check after promotion sees it too
    assert check_slo(w, cfg.guardrails)[0].startswith(f"error rate {w.candidate.error_rate:.1%}")


def test_a_clean_candidate_passes_on_the_same_kind_of_traffic(live: Live) -> None:
    with window_of(live) as span:
        send(live.url, inputs(USERS, seed=3), "good")
    counters = httpx.get(f"{live.url}/v1/mlops/stats", params={"since": span[0]}).json()["releases"]
    w = read_window(Session.open(live.loaded).registry, live.cand, live.prod, span[0], span[1], counters)
    v = judge_step(w, live.loaded.cfg.deploy.rollout, live_metrics(live.loaded), step=2, percent=50)
    assert v.decision == "pass", v.checks
    assert [c["name"] for c in v.checks] == ["error_rate", "latency", "metric.json_valid", "metric.regex"]
    assert all(n >= 30 for c in v.checks[2:] for n in c["n"])
    assert check_slo(w, live.loaded.cfg.deploy.rollout.guardrails) == []


def test_too_little_traffic_extends_then_fails_or_is_judged_on_a_replay(live: Live) -> None:
    reg = Session.open(live.loaded).registry
    with window_of(live) as span:
        send(live.url, inputs(30, seed=4), "thin")
    thin = read_window(reg, live.cand, live.prod, span[0], span[1])
    assert thin.candidate.requests + thin.production.requests == 30
    cfg = live.loaded.cfg.deploy.rollout
    metrics = live_metrics(live.loaded)
    assert judge_step(thin, cfg, metrics, extensions=0).decision == "extend"
    out = judge_step(thin, cfg, metrics, extensions=cfg.analysis.max_extensions)
    assert out.decision == "fail" and out.reasons[0].startswith("too little live traffic after 3 extensions")
    replay_cfg = cfg.model_copy(
        update={"analysis": cfg.analysis.model_copy(update={"on_insufficient_traffic": "replay"})}
    )
    assert judge_step(thin, replay_cfg, metrics, extensions=3).decision == "replay"

    # the replay: eval prompts pinned to each release, as mlops's own (never captured) requests
    with window_of(live) as span2:
        rw = replay_window(live.url, inputs(20, seed=5), live.cand, live.prod, 60, model="tiny", max_tokens=6)
    assert (rw.source, rw.candidate.requests, rw.production.requests) == ("replay", 60, 60)
    assert read_window(reg, live.cand, live.prod, span2[0], span2[1]).candidate.requests == 0
    v = judge_step(rw, replay_cfg, metrics, extensions=3)
    assert v.decision == "pass" and v.mode == "replay", v.checks
    # a replay of a failing candidate fails
    live.opts.fault = Fault(live.cand, 0.2)
    try:
        bad = replay_window(live.url, inputs(20, seed=6), live.cand, live.prod, 60, model="tiny", max_tokens=6)
    finally:
        live.opts.fault = None
    assert bad.candidate.errors == 12 and judge_step(bad, replay_cfg, metrics).decision == "fail"


def test_a_judge_metric_scores_only_its_sample_of_live_answers(live: Live) -> None:
    from test_judges import JudgeServer

    with window_of(live) as span:
        send(live.url, inputs(120, seed=7), "judged")
    w = read_window(Session.open(live.loaded).registry, live.cand, live.prod, span[0], span[1])
    with contextlib.contextmanager(JudgeServer().running)() as judge:
        sets = [
            f"judges={{local: {{base_url: '{judge.base_url}', model: judge-1, timeout_s: 60, max_retries: 0}}}}",
            "evals.heldout.judge=local",
            "evals.heldout.metrics=[exact_match, latency, deepeval.answer_relevancy]",
            "deploy.rollout.analysis.metrics=[deepeval.answer_relevancy]",
            "deploy.rollout.analysis.judge_sample=4",
        ]
        loaded = load(live.loaded.root / "mlops.yaml", sets)
        (metric,) = live_metrics(loaded)
        v = judge_step(w, loaded.cfg.deploy.rollout, [metric])
        calls = judge.total
    check = v.checks[2]
    assert check["name"] == "metric.deepeval.answer_relevancy" and check["n"] == [4, 4], v.checks
    assert check["status"] == "pass"  # the same sample size on both sides: enough for a judge metric
    # about 60 answers a side were there; the judge was asked about 4 each (3 calls per answer, no retries)
    assert min(w.candidate.requests, w.production.requests) > 30 and 0 < calls <= 8 * 3, calls
