"""Shadow traffic through the Modal gateway: a share of production's requests mirrored to the shadow
release (the user answered by production only), the pairs shared by every gateway container.

The local server mirrors inside its own process (shadow.py). A gateway container's memory cannot
hold a shadow step's window, for the reasons its live stats cannot (shared_stats.py: it scales to
zero, is replaced on redeploy, runs several containers). So each container keeps its own pairs and
writes them with its stats (`SharedStats.share`: in the same flush, before the same heartbeat) under
`shadow:<container>`; `/v1/mlops/stats` on any container merges every container's pairs into the
local server's shape: `shadow` (per shadow release: mirrored, errors, error_rate, agreement, p95,
production_p95, disagreements) and `shadow_pending` (mirrored requests still running in a live
container), so `shadow_verdict` and both rollout drivers read it unchanged.

A mirrored request is a copy of the user's body, sent to the shadow release's server whole (not
streamed) when production's request is, in a task of its own: the user's answer never waits on it.
It gets `timeout` seconds; a slower one counts against the candidate as timed out, as the local
server's does. The pair is recorded once production has answered too (its text from the JSON or
from the streamed events), and dropped when production answered 4xx (the user's request was bad,
not the candidate).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from mlops.registry.releases import State
from mlops.serving.routing import shadow_target
from mlops.serving.shared_stats import KEEP_S, STATS, SharedStats
from mlops.serving.stats import LiveStats, percentile

SHADOW = "shadow:"  # the Dict key prefix of each container's pairs
WINDOW = 5_000  # pairs kept per shadow release (per container on Modal), as the local server keeps
EXAMPLES = 5  # disagreements kept per shadow release (per container), for the report
TIMEOUT_S = 120.0  # a warm vLLM answers within seconds; a shadow step should not wait on a cold start
MAX_INFLIGHT = 256  # mirrored requests running per container: past it a request is not mirrored
MAX_TEXT = 500  # characters of a prompt or output kept in a disagreement
MAX_STREAM_BYTES = 1 << 20  # production's streamed answer kept to compare; past it, "not compared"

# A request of the gateway's own to a release: (release, path, body) -> (status, body read whole)
Post = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, bytes]]]
Outcome = tuple[str | None, float, str | None]  # (text, seconds, error)


def answer_text(doc: Any) -> str | None:
    """The first choice's text of a completion or chat completion answer."""
    try:
        choice = doc["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(choice, dict):
        return None
    if "message" in choice:
        return (choice["message"] or {}).get("content")
    return choice.get("text")


def streamed_text(raw: bytes) -> str | None:
    """The first choice's text, put back together from server-sent events."""
    parts: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        try:
            choice = (json.loads(data).get("choices") or [{}])[0]
        except (ValueError, AttributeError, IndexError):
            return None
        if choice.get("index", 0) == 0:
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _failure(status: int, content: bytes) -> str:
    try:
        msg = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        msg = content[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {msg[:200]}"


def _prompt(body: Mapping[str, Any]) -> str:
    p = body.get("prompt") if "prompt" in body else body.get("messages")
    return (p if isinstance(p, str) else json.dumps(p))[:MAX_TEXT]


def summary(
    mirrored: int,
    errors: int,
    agreed: int,
    shadow_s: list[float],
    production_s: list[float],
    disagreements: list[dict[str, Any]],
) -> dict[str, Any]:
    """One shadow release's window as the analysis reads it (`shadow_verdict`), from the local
    server's pairs (shadow.py) or the gateway's; latencies of the pairs neither side failed."""
    return {
        "mirrored": mirrored,
        "errors": errors,
        "error_rate": errors / mirrored if mirrored else 0.0,
        "agreement": agreed / mirrored if mirrored else 0.0,
        "p95": percentile(shadow_s, 0.95),
        "production_p95": percentile(production_s, 0.95),
        "disagreements": disagreements[:EXAMPLES],
    }


class Mirror:
    """One mirrored request; the gateway tells it how production answered (`answered`, or `tee`
    around a streamed answer)."""

    def __init__(self) -> None:
        self.production: asyncio.Future[tuple[int, str | None, float, str | None]] = (
            asyncio.get_running_loop().create_future()
        )

    def answered(self, status: int, content: bytes | None, t0: float, streamed: bool = False) -> None:
        """Production's answer: its status, body (None: it broke off) and start (perf_counter)."""
        if self.production.done():
            return
        secs = time.perf_counter() - t0
        if content is None or status >= 500:
            error = f"HTTP {status}" if content is not None else "production's answer broke off"
            self.production.set_result((status, None, secs, error))
            return
        text = streamed_text(content) if streamed else answer_text(_json(content))
        self.production.set_result((status, text, secs, None))

    async def tee(self, chunks: AsyncIterator[bytes], status: int, t0: float) -> AsyncIterator[bytes]:
        """Pass a streamed answer through to the user, keeping it to compare."""
        kept, complete = bytearray(), False
        try:
            async for chunk in chunks:
                if len(kept) <= MAX_STREAM_BYTES:
                    kept += chunk
                yield chunk
            complete = True
        finally:
            too_long = len(kept) > MAX_STREAM_BYTES
            self.answered(status, bytes(kept) if complete and not too_long else None, t0, streamed=True)


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


class SharedShadow:
    """`wants` and `mirror` on the request path; `live(stats, since)` is the stats route's view."""

    def __init__(
        self,
        stats: LiveStats | SharedStats | None = None,
        timeout: float = TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout, self._clock = timeout, clock
        self.pending = 0
        self._rows: dict[str, deque[list[Any]]] = {}  # per release: [at, production_s, shadow_s, error, p_error, agree]
        self._examples: dict[str, deque[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._dirty = True  # the first flush says "nothing pending" for this container
        self._tasks: set[asyncio.Task[None]] = set()
        if isinstance(stats, SharedStats):
            stats.share(SHADOW, self.snapshot)

    def wants(self, st: State, release: str, key: str | None, pinned: bool, n: int) -> str | None:
        """The shadow release to mirror this request to, or None (as the local server picks)."""
        target = shadow_target(st, release, key, pinned, n)
        return target if target is not None and self.pending < MAX_INFLIGHT else None

    def mirror(self, target: str, path: str, body: dict[str, Any], post: Post) -> Mirror:
        """Send a copy of `body` (before the gateway points it at production) to `target` now."""
        copy = {k: v for k, v in body.items() if k != "stream_options"} | {"model": target, "stream": False}
        m = Mirror()
        with self._lock:
            self.pending += 1
            self._dirty = True
        task = asyncio.get_running_loop().create_task(self._run(m, target, path, copy, post))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return m

    async def _run(self, m: Mirror, target: str, path: str, body: dict[str, Any], post: Post) -> None:
        recorded = False
        try:
            shadow = await self._ask(target, path, body, post)
            try:
                p_status, p_text, p_secs, p_error = await asyncio.wait_for(asyncio.shield(m.production), self.timeout)
            except TimeoutError:
                return  # production never said how it answered: nothing to pair with
            if 400 <= p_status < 500:
                return
            text, secs, error = shadow
            agree = error is None and p_error is None and p_text is not None and p_text == text
            row = [round(self._clock(), 4), round(p_secs, 5), round(secs, 5), error is not None, p_error is not None]
            example = None
            if not agree:
                example = {
                    "at": row[0],
                    "prompt": _prompt(body),
                    "shadow": target,
                    "production_output": None if p_text is None else p_text[:MAX_TEXT],
                    "shadow_output": None if text is None else text[:MAX_TEXT],
                    "production_s": row[1],
                    "shadow_s": row[2],
                    "error": error,
                    "production_error": p_error,
                    "agree": False,
                }
            self._add(target, [*row, agree], example)
            recorded = True
        finally:
            if not recorded:
                with self._lock:
                    self.pending -= 1
                    self._dirty = True

    async def _ask(self, target: str, path: str, body: dict[str, Any], post: Post) -> Outcome:
        t0 = time.perf_counter()
        try:
            status, content = await asyncio.wait_for(post(target, path, body), self.timeout)
        except TimeoutError:
            return None, self.timeout, "shadow request timed out"
        except Exception as e:  # the candidate unreachable is the candidate's error, never the user's
            return None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:300]
        secs = time.perf_counter() - t0
        if status >= 400:
            return None, secs, _failure(status, content)
        text = answer_text(_json(content))
        return (text, secs, None) if text is not None else (None, secs, "an answer with no text")

    def _add(self, target: str, row: list[Any], example: dict[str, Any] | None) -> None:
        with self._lock:
            self._rows.setdefault(target, deque(maxlen=WINDOW)).append(row)
            if example is not None:
                self._examples.setdefault(target, deque(maxlen=EXAMPLES)).append(example)
            self.pending -= 1
            self._dirty = True

    async def close(self) -> None:
        """A container stopping: its mirrored requests still running are dropped, not waited on."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self, force: bool = False) -> dict[str, Any] | None:
        """This container's pairs and pending count (None: unchanged since the last snapshot)."""
        with self._lock:
            if not (self._dirty or force):
                return None
            self._dirty = False
            horizon = self._clock() - KEEP_S
            for rows in self._rows.values():
                while rows and rows[0][0] < horizon:
                    rows.popleft()
            return {
                "pending": self.pending,
                "rows": {rel: [list(r) for r in rows] for rel, rows in self._rows.items() if rows},
                "examples": {rel: list(ex) for rel, ex in self._examples.items()},
            }

    @staticmethod
    def merge(docs: Mapping[str, Any], alive: set[str], since: float) -> tuple[dict[str, dict[str, Any]], int]:
        """Every container's pairs after `since`, per shadow release, as the local server's
        `Shadow.window`; and the mirrored requests still running in the `alive` containers."""
        rows: dict[str, list[list[Any]]] = {}
        examples: dict[str, list[dict[str, Any]]] = {}
        pending = 0
        for container, doc in docs.items():
            doc = doc or {}
            pending += int(doc.get("pending", 0)) if container in alive else 0
            for rel, rs in (doc.get("rows") or {}).items():
                rows.setdefault(rel, []).extend(r for r in rs if float(r[0]) >= since)
            for rel, ex in (doc.get("examples") or {}).items():
                examples.setdefault(rel, []).extend(e for e in ex if float(e["at"]) >= since)
        out: dict[str, dict[str, Any]] = {}
        for rel, rs in rows.items():
            ok = [r for r in rs if not r[3] and not r[4]]
            out[rel] = summary(
                len(rs),
                sum(1 for r in rs if r[3]),
                sum(1 for r in rs if r[5]),
                [float(r[2]) for r in ok],
                [float(r[1]) for r in ok],
                sorted(examples.get(rel, []), key=lambda e: float(e["at"])),
            )
        return out, pending

    def live(self, stats: LiveStats | SharedStats, since: float) -> dict[str, Any]:
        """`releases`, `shadow` and `shadow_pending` of `/v1/mlops/stats`, from one settled read of
        every container (a reader waits once, not once per kind of row)."""
        if isinstance(stats, SharedStats):
            docs, beats = stats.gather(STATS, SHADOW)
            shadow, pending = self.merge(docs[SHADOW], stats.alive(beats), since)
            return {"releases": stats.merge(docs[STATS], since), "shadow": shadow, "shadow_pending": pending}
        shadow, pending = self.merge({"": self.snapshot(force=True)}, {""}, since)
        return {"releases": stats.window(since), "shadow": shadow, "shadow_pending": pending}
