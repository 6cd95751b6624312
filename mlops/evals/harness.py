"""Run an eval suite against an OpenAI-compatible endpoint, then score it with the suite's metrics.

Requests go out concurrently (httpx.AsyncClient + a semaphore), each with a timeout and bounded
retries that honour Retry-After; a failure becomes a failed case with its reason, never a NaN.
A disk cache keyed by (release, request) makes an unchanged rerun cost zero endpoint calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlops.config import Loaded
from mlops.errors import ConfigError
from mlops.evals.metrics import build_metric, metric_name
from mlops.evals.stats import aggregate
from mlops.evals.types import Case, Metric, Output
from mlops.registry.releases import now
from mlops.training.data import read_jsonl

RETRY_STATUSES = (429, 502, 503, 504)
MAX_RETRY_WAIT = 10.0  # cap on a server's Retry-After, so one bad hint cannot stall a run


def load_cases(loaded: Loaded, suite: str) -> list[Case]:
    ev = loaded.cfg.evals[suite]
    ds = loaded.cfg.datasets[ev.dataset]
    rows = read_jsonl(loaded.dataset_path(ev.dataset), ds.input_field, ds.target_field)
    cases = [Case(r.id, r.input, r.expected, r.context) for r in rows]
    if len({c.id for c in cases}) != len(cases):
        raise ConfigError(f"{ds.path}: case ids must be unique")
    return cases[: ev.limit] if ev.limit else cases


class DiskCache:
    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            return dict(json.loads(self._path(key).read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.root is None:
            return
        from mlops.registry.store import atomic_write

        atomic_write(self._path(key), json.dumps(value).encode())


async def _call(client: Any, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float, retries: int) -> Output:
    import httpx

    t0 = time.perf_counter()
    last = "no attempt"
    for attempt in range(retries + 1):
        try:
            r = await client.post(url, json=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            last = f"timeout after {timeout:g}s"
            continue
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            continue
        if r.status_code in RETRY_STATUSES and attempt < retries:
            last = f"HTTP {r.status_code}"
            await asyncio.sleep(_retry_after(r.headers.get("retry-after"), attempt))
            continue
        if r.status_code != 200:
            return Output("", time.perf_counter() - t0, f"HTTP {r.status_code}: {r.text[:200]}", r.headers.get("x-mlops-release"))
        data = r.json()
        choice = data["choices"][0]
        text = choice.get("text") if "text" in choice else choice["message"]["content"]
        usage = data.get("usage") or {}
        return Output(text or "", time.perf_counter() - t0, None, r.headers.get("x-mlops-release"), int(usage.get("completion_tokens", 0)))
    return Output("", time.perf_counter() - t0, last)


def _retry_after(value: str | None, attempt: int) -> float:
    try:
        wait = float(value) if value is not None else 0.1 * 2**attempt
    except ValueError:
        wait = 0.1 * 2**attempt
    return max(0.0, min(wait, MAX_RETRY_WAIT))


async def query_all(
    base_url: str,
    cases: list[Case],
    release: str,
    prompt_template: str,
    max_tokens: int,
    concurrency: int,
    timeout: float,
    cache: DiskCache,
    retries: int = 2,
    api_key: str | None = None,
    model: str | None = None,
) -> tuple[list[Output], dict[str, int]]:
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"x-mlops-release": release}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    sem = asyncio.Semaphore(concurrency)
    counts = {"endpoint_calls": 0, "cache_hits": 0}

    async def one(client: httpx.AsyncClient, case: Case) -> Output:
        body = {"model": model or release, "prompt": prompt_template.format(input=case.input), "max_tokens": max_tokens, "temperature": 0}
        key = DiskCache.key("completion", release, body)
        hit = cache.get(key)
        if hit is not None:
            counts["cache_hits"] += 1
            return Output(**(hit | {"cached": True}))
        async with sem:
            counts["endpoint_calls"] += 1
            out = await _call(client, url, body, headers, timeout, retries)
        if out.error is None:  # failures are retried on the next run, never cached
            cache.put(key, asdict(out) | {"cached": False})
        return out

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        outs = await asyncio.gather(*(one(client, c) for c in cases))
    return list(outs), counts


def score(metrics: list[Metric], cases: list[Case], outputs: list[Output]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    per_case: list[dict[str, Any]] = [
        {"id": c.id, "input": c.input, "expected": c.expected, "output": o.text, "latency_s": round(o.latency_s, 6), "error": o.error, "scores": {}, "reasons": {}}
        for c, o in zip(cases, outputs, strict=True)
    ]
    summary: dict[str, Any] = {}
    for m in metrics:
        scores = m.score_batch(cases, outputs)
        vals = []
        for row, s in zip(per_case, scores, strict=True):
            v = float(s.value) if math.isfinite(s.value) else 0.0
            row["scores"][m.name] = v
            if s.reason:
                row["reasons"][m.name] = s.reason
            vals.append(v)
        summary[m.name] = {
            "higher_is_better": m.higher_is_better,
            "mean": aggregate(vals, "mean"),
            "p50": aggregate(vals, "p50"),
            "p95": aggregate(vals, "p95"),
            "p99": aggregate(vals, "p99"),
            "failed": sum(1 for s in scores if s.failed),
        }
    return summary, per_case


JUDGE_BASED = ("deepeval.geval", "deepeval.answer_relevancy")


def build_metrics(loaded: Loaded, suite: str) -> list[Metric]:
    """The suite's metric objects; judge-based ones get the suite's default judge unless they name one."""
    ev = loaded.cfg.evals[suite]
    judges: dict[str, Any] = {}
    if loaded.cfg.judges:
        from mlops.evals.judges import JudgeSpec

        judges = {k: JudgeSpec(**v.model_dump()) for k, v in loaded.cfg.judges.items()}
    out = []
    for spec in ev.metrics:
        if ev.judge and metric_name(spec) in JUDGE_BASED:
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            spec.setdefault("judge", ev.judge)
        out.append(build_metric(spec, loaded.root, judges))
    return out


def run_suite(loaded: Loaded, suite: str, release: str, base_url: str, cache_dir: Path | None, api_key: str | None = None) -> dict[str, Any]:
    """Evaluate `release` (pinned through the endpoint) on one suite; return the result document."""
    t0 = time.perf_counter()
    cfg = loaded.cfg
    ev = cfg.evals[suite]
    model = cfg.models[cfg.deploy.model]
    cases = load_cases(loaded, suite)
    metrics = build_metrics(loaded, suite)
    cache = DiskCache(cache_dir / "eval" if cache_dir else None)
    outputs, counts = asyncio.run(
        query_all(base_url, cases, release, model.prompt, model.max_tokens, ev.concurrency, ev.timeout, cache, api_key=api_key)
    )
    t_query = time.perf_counter() - t0
    summary, per_case = score(metrics, cases, outputs)
    return {
        "suite": suite,
        "release": release,
        "created_at": now(),
        "n": len(cases),
        "metrics": summary,
        "metric_names": [metric_name(s) for s in ev.metrics],
        "cases": per_case,
        "cost": counts | {
            "completion_tokens": sum(o.completion_tokens for o in outputs),
            "errors": sum(1 for o in outputs if o.error),
            "query_s": round(t_query, 3),
            "wall_s": round(time.perf_counter() - t0, 3),
            "judge_calls": sum(int(getattr(m, "judge_calls", 0)) for m in metrics),
        },
    }
