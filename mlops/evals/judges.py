"""LLM judges: an OpenAI-compatible chat endpoint that scores outputs for judge-based metrics.

`JudgeSpec` is what `mlops.yaml` says about a judge (`judges: {name: JudgeSpec}`); `JudgeClient`
calls it. The client is built for eval runs that must be cheap to repeat and honest when they fail:

- every call has a hard wall-clock timeout (`timeout_s`, the whole request, not per socket read);
- transient failures (timeouts, connection errors, 429, 5xx) are retried at most `max_retries`
  times with exponential backoff; `Retry-After` on 429/503 is honoured (seconds, integer or
  decimal, or an HTTP date), capped at `timeout_s`;
- at most `concurrency` requests are in flight per event loop;
- answers are cached on disk (one JSON file per request, keyed by the sha256 of judge model,
  base URL and request body), so an unchanged rerun makes no calls at all;
- `calls`, `retries`, `cache_hits`, `failures` and token usage are counted for the cost report;
- a call that finally fails raises `JudgeError` with a short reason (`timeout`, `http 500`,
  `bad response: ...`). Callers turn it into a failed Score (value 0, failed=True) for that case.

The API key is read from the environment variable *named* by `api_key_env` at call time. Its value
never appears in a log line, an exception, or a cache file (the cache key and file hold the
request body, which carries no credentials; error text is scrubbed of the value regardless).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from mlops.cache import FileCache
from mlops.config import JudgeCfg
from mlops.errors import ConfigError, InfraError
from mlops.retry import Retryable, retry_after_s, retrying

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0

# Which repetition of a judged case a call belongs to (see JudgeSpec.repeat). Set by the metric
# wrappers around each repetition; it goes into the cache key only, never into the request, so a
# noisy judge asked N times is really asked N times, and each answer is cached on its own.
judge_sample: contextvars.ContextVar[int] = contextvars.ContextVar("judge_sample", default=0)


JudgeSpec = JudgeCfg  # what `mlops.yaml` says about a judge: one model, defined with the config


class JudgeError(InfraError):
    """A judge call that failed for good. `reason` is short and safe to show in a report."""

    def __init__(self, reason: str, *, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # timeout | http | connection | bad_response | config


_retry_after_s = retry_after_s  # the tests' name for it


class _Retry(Retryable):
    """A judge failure worth another attempt; the JudgeError is what the caller finally sees."""

    def __init__(self, error: JudgeError, wait_s: float | None = None) -> None:
        super().__init__(error.reason, wait_s)
        self.error = error


class _LoopState:
    def __init__(self, concurrency: int) -> None:
        self.sem = asyncio.Semaphore(concurrency)
        self.http: httpx.AsyncClient | None = None
        self.inflight: dict[str, asyncio.Future[str]] = {}


class JudgeClient:
    """Calls one judge. Safe to share between metrics; state is kept per event loop."""

    def __init__(
        self,
        spec: JudgeSpec,
        cache_dir: Path | None = None,
        *,
        name: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        # sent with every request: a self-hosted judge's app on Modal wants a Proxy Auth Token
        self.headers = dict(headers or {})
        self.name = name or spec.model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache = FileCache(self.cache_dir)
        self.calls = 0  # HTTP requests sent (every attempt, retries included)
        self.retries = 0
        self.cache_hits = 0  # answers served without a request (disk cache or an identical call in flight)
        self.failures = 0  # complete() calls that ended in JudgeError
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._lock = threading.Lock()
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "model": self.spec.model,
            "calls": self.calls,
            "retries": self.retries,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._lock:
            for old in [lp for lp in self._states if lp.is_closed()]:
                del self._states[old]
            st = self._states.get(loop)
            if st is None:
                st = self._states[loop] = _LoopState(self.spec.concurrency)
            return st

    async def aclose(self) -> None:
        """Close this event loop's HTTP connections. Call before the loop ends."""
        loop = asyncio.get_running_loop()
        with self._lock:
            st = self._states.pop(loop, None)
        if st is not None and st.http is not None:
            await st.http.aclose()

    # ---- request pieces ----------------------------------------------------------------------

    def _api_key(self) -> str | None:
        name = self.spec.api_key_env
        if not name:
            return None
        value = os.environ.get(name)
        if not value:
            raise JudgeError(f"judge {self.name}: environment variable {name} is not set", kind="config")
        return value

    def _scrub(self, text: str) -> str:
        name = self.spec.api_key_env
        value = os.environ.get(name) if name else None
        if value:
            text = text.replace(value, "***")
        return text

    def request_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"model": self.spec.model, "messages": messages, "temperature": self.spec.temperature}
        return body | ({"max_tokens": self.spec.max_tokens} if self.spec.max_tokens else {})

    def cache_key(self, body: dict[str, Any], sample: int = 0) -> str:
        blob = json.dumps(
            {"model": self.spec.model, "base_url": self.spec.base_url, "body": body, "sample": sample},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_get(self, key: str) -> str | None:
        data = self._cache.get(key)
        content = data.get("content") if data is not None else None
        return content if isinstance(content, str) else None

    def _cache_put(self, key: str, body: dict[str, Any], content: str) -> None:
        record = {"model": self.spec.model, "base_url": self.spec.base_url, "request": body, "content": content}
        self._cache.put(key, record)

    # ---- the call ----------------------------------------------------------------------------

    async def complete(self, messages: list[dict[str, Any]], *, sample: int | None = None) -> str:
        """The judge's answer (the first choice's message content) to `messages`."""
        body = self.request_body(messages)
        key = self.cache_key(body, judge_sample.get() if sample is None else sample)
        cached = self._cache_get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        st = self._state()
        pending = st.inflight.get(key)
        if pending is not None:  # the same request is already on its way: share its answer
            self.cache_hits += 1
            try:
                return await asyncio.shield(pending)
            except JudgeError:
                self.failures += 1
                raise
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        st.inflight[key] = fut
        try:
            content = await self._call(st, body)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e if isinstance(e, JudgeError) else JudgeError("cancelled", kind="error"))
                fut.exception()  # mark retrieved: waiters (if any) still get it
            if isinstance(e, JudgeError):
                self.failures += 1
            raise
        else:
            fut.set_result(content)
            try:
                self._cache_put(key, body, content)
            except OSError as e:  # a full or read-only disk costs a rerun its cache, not this answer
                log.warning("judge %s: could not write cache entry: %s", self.name, e)
            return content
        finally:
            st.inflight.pop(key, None)

    async def _call(self, st: _LoopState, body: dict[str, Any]) -> str:
        spec = self.spec
        if not spec.base_url:  # a self-hosted judge: the Modal backend fills in its app's URL
            raise JudgeError(
                f"judge {self.name} is self-hosted (source: {spec.source}): it is served on backend: modal",
                kind="config",
            )
        headers = {"Content-Type": "application/json", **self.headers}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{spec.base_url}/chat/completions"

        async def attempt() -> str:
            try:
                async with st.sem:
                    if st.http is None:
                        st.http = httpx.AsyncClient(
                            timeout=httpx.Timeout(spec.timeout_s),
                            limits=httpx.Limits(max_connections=spec.concurrency),
                        )
                    self.calls += 1
                    async with asyncio.timeout(spec.timeout_s):
                        resp = await st.http.post(url, json=body, headers=headers)
            except (TimeoutError, httpx.TimeoutException):
                raise _Retry(JudgeError(f"timeout after {spec.timeout_s:g}s", kind="timeout")) from None
            except httpx.HTTPError as e:
                msg = self._scrub(f"connection error: {type(e).__name__}: {e}")
                raise _Retry(JudgeError(msg, kind="connection")) from None
            if 200 <= resp.status_code < 300:
                return self._parse(resp)
            error = JudgeError(f"http {resp.status_code}{self._snippet(resp)}", kind="http")
            if resp.status_code not in RETRY_STATUSES:
                raise error
            wait_s = None
            if resp.status_code in RETRY_AFTER_STATUSES:
                ra = retry_after_s(resp.headers.get("retry-after"))
                wait_s = None if ra is None else min(ra, spec.timeout_s)
            raise _Retry(error, wait_s)

        def backoff(n: int) -> float:
            return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**n) * (0.8 + 0.4 * random.random())

        def on_retry(e: Retryable, n: int, wait_s: float) -> None:
            self.retries += 1
            log.info("judge %s: %s; retry %d/%d in %.2fs", self.name, e.reason, n, spec.max_retries, wait_s)

        try:
            return await retrying(attempt, retries=spec.max_retries, backoff=backoff, on_retry=on_retry)
        except _Retry as e:
            error = e.error
            if e.attempts > 1:
                error = JudgeError(f"{error.reason} (after {e.attempts} attempts)", kind=error.kind)
            raise error from None

    def _snippet(self, resp: httpx.Response) -> str:
        try:
            text = resp.text.strip().replace("\n", " ")
        except Exception:
            return ""
        return f": {self._scrub(text)[:200]}" if text else ""

    def _parse(self, resp: httpx.Response) -> str:
        try:
            data = resp.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"bad response: not an OpenAI chat completion{self._snippet(resp)}", kind="bad_response"
            ) from None
        if not isinstance(content, str):
            raise JudgeError("bad response: message content is not a string", kind="bad_response")
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        return content

    # ---- sync --------------------------------------------------------------------------------

    def complete_sync(self, messages: list[dict[str, Any]], *, sample: int | None = None) -> str:
        """`complete` for synchronous callers (works inside a running event loop too)."""
        if sample is None:
            sample = judge_sample.get()

        async def once() -> str:
            try:
                return await self.complete(messages, sample=sample)
            finally:
                await self.aclose()

        return run_sync(once)


def json_object(text: str) -> Any:
    """The outermost JSON object in a judge's answer (models wrap JSON in prose or code fences)."""
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end < start:
        raise ValueError("no JSON object")
    return json.loads(text[start : end + 1])


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine `make()` to completion from synchronous code.

    With no event loop running in this thread it uses `asyncio.run`; inside a running loop (a
    notebook, an async caller) it runs on a fresh loop in a worker thread, so it never nests loops
    and never blocks on the caller's loop.
    """

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    ctx = contextvars.copy_context()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlops-eval") as ex:
        return ex.submit(ctx.run, asyncio.run, main()).result()


def client_for(
    judge: str | None,
    judges: dict[str, Any],
    metric: str,
    cache_dir: Path | None = None,
) -> JudgeClient:
    """The JudgeClient a metric names with its `judge` parameter (or the only judge configured).

    `judges` maps names to JudgeSpec (or plain dicts of its fields) or to ready JudgeClient objects;
    pass clients to share counters and a cache directory between metrics. For specs, the cache
    directory is `cache_dir`, else $MLOPS_JUDGE_CACHE_DIR, else none.
    """
    if judge is None:
        if len(judges) != 1:
            have = ", ".join(sorted(judges)) or "none configured"
            raise ConfigError(f"metric {metric!r} needs a 'judge' parameter naming one of the judges ({have})")
        judge = next(iter(judges))
    if judge not in judges:
        have = ", ".join(sorted(judges)) or "none configured"
        raise ConfigError(f"metric {metric!r}: unknown judge {judge!r} (judges: {have})")
    value = judges[judge]
    if isinstance(value, JudgeClient):
        return value
    spec = value if isinstance(value, JudgeSpec) else JudgeSpec.model_validate(value)
    if cache_dir is None and os.environ.get("MLOPS_JUDGE_CACHE_DIR"):
        cache_dir = Path(os.environ["MLOPS_JUDGE_CACHE_DIR"])
    return JudgeClient(spec, cache_dir, name=judge)
