"""Run an eval suite against an OpenAI-compatible endpoint, then score it with the suite's metrics.

- Requests go out concurrently (one httpx.AsyncClient, a semaphore of `evals.<suite>.concurrency`
  held only while a request is in flight).
- Every attempt has a wall-clock `timeout` (the whole request, not per socket read). A timed-out
  case fails at once, without a retry: a hung call is usually hung again, and retrying it would
  multiply the eval's worst case by the retry count. So a suite ends within about one timeout of
  its slowest healthy case, whatever hangs.
- Connection errors and 429/502/503/504 are retried at most `retries` times, waiting as long as
  `Retry-After` says (capped at MAX_RETRY_WAIT) or a short exponential backoff.
- A failure is a failed case with its reason (`timeout after 30s`, `HTTP 500: ...`), never a NaN
  and never a lost case; a metric that raises fails only the cases it could not score.
- A disk cache keyed by (release, request) makes an unchanged rerun cost zero endpoint calls, and
  judge-based metrics share one JudgeClient per judge with its own disk cache
  (`.mlops/cache/judge`), so the rerun costs zero judge calls too.

deepeval and ragas are imported only when a suite names one of their metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mlops.cache import SegmentCache as DiskCache
from mlops.config import Loaded, metric_name
from mlops.configmonitor import NOT_CAPTURED
from mlops.contracts import CaseRow, EvalCost, EvalResult, JudgeStats, MetricSummary
from mlops.data import read_dataset
from mlops.errors import ConfigError
from mlops.evals.metrics import build_metric
from mlops.evals.stats import aggregate
from mlops.evals.types import Case, Metric, Output, Score
from mlops.plugins import JUDGE_METRICS
from mlops.retry import Retryable, retry_after_s, retrying
from mlops.util import now

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_WAIT = 10.0  # cap on a server's Retry-After, so one bad hint cannot stall a run
BACKOFF_S = 0.1  # first backoff without a Retry-After; doubles per attempt, capped at 2 s
FAILED_LOW = 0.0  # a failed case's value on a higher-is-better metric
FAILED_HIGH = 1e9  # ... and on a lower-is-better one (as metrics._PerCase does): worst, but finite
JUDGE_BASED = JUDGE_METRICS  # the suite's `judge` is their default


def load_cases(loaded: Loaded, suite: str) -> list[Case]:
    ev = loaded.cfg.evals[suite]
    ds = loaded.cfg.datasets[ev.dataset]
    rows = read_dataset(loaded, ev.dataset)
    cases = [Case(r.id, r.input, r.expected, r.context, tags=r.tags, messages=r.messages, tools=r.tools) for r in rows]
    if len({c.id for c in cases}) != len(cases):
        raise ConfigError(f"{ds.path}: case ids must be unique")
    return cases[: ev.limit] if ev.limit else cases


def check_segments(loaded: Loaded, suite: str, cases: list[Case]) -> None:
    """A gate on `segment: <tag>` that no case of the suite carries is a config error (exit 1), not a
    gate that passes on nothing. `mlops validate` catches it earlier when it can read the dataset."""
    have = {t for c in cases for t in c.tags}
    for i, g in enumerate(loaded.cfg.gates):
        if g.eval == suite and g.segment is not None and g.segment not in have:
            from mlops.plugins import did_you_mean

            hint = did_you_mean(g.segment, have) if have else "(no case of the suite has tags)"
            raise ConfigError(f"gates[{i}].segment: no case of eval {suite!r} has tag {g.segment!r} {hint}")


def _parse(r: httpx.Response) -> tuple[str, int]:
    data = r.json()
    choice = data["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}")
    usage = data.get("usage") or {}
    return text, int(usage.get("completion_tokens") or 0)


@dataclass
class Counts:
    endpoint_calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cache_hits: int = 0
    errors: int = 0


@dataclass
class Endpoint:
    """Where and how to ask for completions of one release."""

    base_url: str
    release: str
    prompt_template: str = "{input}"
    max_tokens: int = 32
    concurrency: int = 16
    timeout: float = 30.0
    retries: int = 2
    api_key: str | None = None
    model: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, case: Case) -> dict[str, Any]:
        """A chat case asks the chat route with its turns (the server renders the model's template,
        or wraps the last user turn in the prompt when the model has none); others a completion."""
        body: dict[str, Any] = {"model": self.model or self.release, "max_tokens": self.max_tokens, "temperature": 0}
        if not case.messages:
            return body | {"prompt": self.prompt_template.format(input=case.input)}
        body["messages"] = [dict(m) for m in case.messages]
        if case.tools:  # in the prompt, the answer as text (vLLM's default "auto" needs a tool parser)
            body |= {"tools": [dict(t) for t in case.tools], "tool_choice": "none"}
        return body


async def _ask(
    client: httpx.AsyncClient, ep: Endpoint, body: dict[str, Any], sem: asyncio.Semaphore, counts: Counts
) -> Output:
    url = ep.base_url.rstrip("/") + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    headers = {"x-mlops-release": ep.release, **NOT_CAPTURED, **ep.headers}
    if ep.api_key:
        headers["authorization"] = f"Bearer {ep.api_key}"
    t_start = time.perf_counter()

    async def attempt() -> Output:
        resp: httpx.Response | None = None
        async with sem:  # held only while a request is in flight, not while waiting to retry
            counts.endpoint_calls += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(ep.timeout):
                    resp = await client.post(url, json=body, headers=headers)
            except (TimeoutError, httpx.TimeoutException):
                return Output("", time.perf_counter() - t_start, f"timeout after {ep.timeout:g}s")
            except httpx.HTTPError as e:
                raise Retryable(f"{type(e).__name__}: {e}".rstrip(": ")) from None
            latency = time.perf_counter() - t0
        answered = resp.headers.get("x-mlops-release")
        if resp.status_code == 200:
            if answered is not None and answered != ep.release:
                return Output("", latency, f"answered by release {answered}, not {ep.release}", answered)
            try:
                text, tokens = _parse(resp)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return Output("", latency, f"bad response: {type(e).__name__}: {e}"[:300], answered)
            return Output(text, latency, None, answered or ep.release, tokens)
        reason = f"HTTP {resp.status_code}: {resp.text.strip()[:200]}".rstrip(": ")
        if resp.status_code not in RETRY_STATUSES:
            return Output("", latency, reason, answered)
        hint = retry_after_s(resp.headers.get("retry-after"))
        raise Retryable(reason, None if hint is None else min(hint, MAX_RETRY_WAIT))

    def count(_e: Retryable, _n: int, _wait: float) -> None:
        counts.retries += 1

    try:
        return await retrying(attempt, retries=ep.retries, backoff=_backoff, on_retry=count)
    except Retryable as e:
        suffix = f" (after {e.attempts} attempts)" if e.attempts > 1 else ""
        return Output("", time.perf_counter() - t_start, e.reason + suffix)


def _backoff(n: int) -> float:
    return min(BACKOFF_S * 2**n, 2.0, MAX_RETRY_WAIT)


async def query_all(ep: Endpoint, cases: list[Case], cache: DiskCache) -> tuple[list[Output], Counts]:
    """One Output per case, in order; failed calls are Outputs with `error` set, never exceptions."""
    sem = asyncio.Semaphore(ep.concurrency)
    counts = Counts()
    known = cache.load(ep.release)
    fresh: dict[str, dict[str, Any]] = {}

    async def one(client: httpx.AsyncClient, case: Case) -> Output:
        key = None
        try:
            body = ep.body(case)
            key = DiskCache.key("completion", ep.release, body)
            hit = known.get(key)
            if hit is not None:
                with contextlib.suppress(TypeError):
                    out = Output(**(hit | {"cached": True}))
                    counts.cache_hits += 1
                    return out
            out = await _ask(client, ep, body, sem, counts)
        except Exception as e:  # a bug or a bad case must not take the other cases down
            out = Output("", 0.0, f"harness error: {type(e).__name__}: {e}"[:300])
        if out.error is None and key is not None:  # failures are asked again next run, never cached
            fresh[key] = asdict(out)
        else:
            counts.errors += 1
        return out

    limits = httpx.Limits(max_connections=ep.concurrency, max_keepalive_connections=ep.concurrency)
    # a plain-http endpoint (the local server, a port-forward) never speaks TLS and redirects are not
    # followed, so loading the CA bundle (tens of ms per run) would buy nothing
    tls = ep.base_url.startswith("https:")
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=ep.timeout, verify=tls) as client:
        outs = await asyncio.gather(*(one(client, c) for c in cases))
    cache.save(ep.release, fresh)
    return list(outs), counts


# ---------------------------------------------------------------------------- scoring


def _failed_value(m: Metric) -> float:
    return FAILED_LOW if m.higher_is_better else FAILED_HIGH


def _score_metric(m: Metric, cases: list[Case], outputs: list[Output]) -> list[Score]:
    """m's scores for every case. A metric that raises is retried case by case, so only the cases
    it cannot score fail; a non-finite value is a failure with a reason, not a NaN."""
    try:
        scores = list(m.score_batch(cases, outputs))
        if len(scores) != len(cases):
            raise ValueError(f"returned {len(scores)} scores for {len(cases)} cases")
    except Exception as e:
        if len(cases) == 1:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return [Score(_failed_value(m), f"{m.name}: {type(e).__name__}: {msg}"[:300].rstrip(": "), True)]
        return [_score_metric(m, [c], [o])[0] for c, o in zip(cases, outputs, strict=True)]
    out = []
    for s in scores:
        v = float(s.value)
        if not math.isfinite(v):
            out.append(Score(_failed_value(m), f"{m.name} returned {v}", True))
        else:
            out.append(Score(v, s.reason, bool(s.failed), tuple(float(x) for x in getattr(s, "samples", ()))))
    return out


def score(
    metrics: list[Metric], cases: list[Case], outputs: list[Output]
) -> tuple[dict[str, MetricSummary], list[CaseRow]]:
    """(summary per metric, one row per case). Rows keep every case, scored or failed."""
    rows = [
        CaseRow(
            id=c.id,
            input=c.input,
            expected=c.expected,
            output=o.text,
            latency_s=round(o.latency_s, 6),
            error=o.error,
            cached=o.cached,
            scores={},
            reasons={},
            failed=[],
            tags=list(c.tags),
        )
        for c, o in zip(cases, outputs, strict=True)
    ]
    summary: dict[str, MetricSummary] = {}
    for m in metrics:
        scores = _score_metric(m, cases, outputs)
        for row, s in zip(rows, scores, strict=True):
            row.scores[m.name] = s.value
            if s.reason:
                row.reasons[m.name] = s.reason
            if s.failed:
                row.failed.append(m.name)
            if len(s.samples) > 1:
                row.samples[m.name] = [round(x, 6) for x in s.samples]
        vals = [s.value for s in scores]
        summary[m.name] = MetricSummary(
            higher_is_better=bool(m.higher_is_better),
            n=len(vals),
            failed=sum(1 for s in scores if s.failed),
            mean=aggregate(vals, "mean"),
            p50=aggregate(vals, "p50"),
            p95=aggregate(vals, "p95"),
            p99=aggregate(vals, "p99"),
        )
    return summary, rows


def build_metrics(loaded: Loaded, suite: str, cache_dir: Path | None = None) -> tuple[list[Metric], dict[str, Any]]:
    """The suite's metric objects, and the judge clients they share (by judge name).

    Judge-based metrics get the suite's default judge unless they name one. All metrics of a run
    that use one judge share one JudgeClient (one concurrency limit, one set of counters) whose
    answers are cached under `cache_dir/judge`.
    """
    clients: dict[str, Any] = {}
    if loaded.cfg.judges:
        from mlops.evals.judges import JudgeClient

        judge_dir = cache_dir / "judge" if cache_dir is not None else None
        clients = {name: JudgeClient(j, judge_dir, name=name) for name, j in loaded.cfg.judges.items()}
    metrics = [build_metric(spec, loaded.root, clients) for spec in metric_specs(loaded, suite)]
    return metrics, clients


def metric_specs(loaded: Loaded, suite: str) -> list[str | dict[str, Any]]:
    """The suite's metric entries, judge-based ones with the suite's default judge filled in."""
    ev = loaded.cfg.evals[suite]
    specs: list[str | dict[str, Any]] = []
    for spec in ev.metrics:
        if ev.judge and metric_name(spec) in JUDGE_BASED:
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            spec.setdefault("judge", ev.judge)
        specs.append(spec)
    return specs


def _judge_cost(clients: dict[str, Any]) -> dict[str, Any]:
    """The judge counters of a suite, as EvalCost's `judge_*` fields (keyword arguments)."""
    stats = [JudgeStats(**c.stats()) for c in clients.values()]
    fields = ("calls", "cache_hits", "retries", "failures", "prompt_tokens", "completion_tokens")
    total = {k: sum(int(getattr(s, k)) for s in stats) for k in fields}
    return {f"judge_{k}": v for k, v in total.items()} | {"judges": [s for s in stats if s.calls or s.cache_hits]}


def run_suite(
    loaded: Loaded,
    suite: str,
    release: str,
    base_url: str,
    cache_dir: Path | None,
    api_key: str | None = None,
    remote: Any = None,
) -> EvalResult:
    """Evaluate `release` (pinned through the endpoint) on one suite; return its result.
    `remote(suite, metrics, clients)` may swap metrics for ones scored elsewhere (the backend's
    eval function: see mlops/evals/fanout.py)."""
    t0 = time.perf_counter()
    cfg = loaded.cfg
    ev = cfg.evals[suite]
    model = cfg.models[cfg.deploy.model]
    cases = load_cases(loaded, suite)
    check_segments(loaded, suite, cases)
    try:
        model.prompt.format(input="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"models.{cfg.deploy.model}.prompt {model.prompt!r}: only {{input}} may be used ({e!r})"
        ) from e
    metrics, clients = build_metrics(loaded, suite, cache_dir)
    if remote is not None:
        metrics = remote(suite, metrics, clients)
    ep = Endpoint(base_url, release, model.prompt, model.max_tokens, ev.concurrency, ev.timeout, ev.retries, api_key)
    cache = DiskCache(cache_dir / "eval" if cache_dir is not None else None)
    outputs, counts = asyncio.run(query_all(ep, cases, cache))
    t_query = time.perf_counter() - t0
    summary, rows = score(metrics, cases, outputs)
    return EvalResult(
        suite=suite,
        release=release,
        created_at=now(),
        n=len(cases),
        metrics=summary,
        metric_names=[m.name for m in metrics],
        cases=rows,
        cost=EvalCost(
            **asdict(counts),
            completion_tokens=sum(o.completion_tokens for o in outputs),
            query_s=round(t_query, 3),
            wall_s=round(time.perf_counter() - t0, 3),
            **_judge_cost(clients),
        ),
    )
