"""One window of live traffic per release, for a rollout step's analysis (mlops/rollout_analysis.py).

`read_window` reads it from the capture records in the registry's store (what every serving path
writes: local server and Modal gateway alike), never from one container's memory; mlops's own
requests carry the not-captured header and are not in it. `replay_window` builds one from eval
prompts replayed at both releases (pinned), for a step that saw too little real traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mlops.configmonitor import NOT_CAPTURED
from mlops.monitor.traffic import Unreadable, Window, capture_keys, read_records
from mlops.util import percentile

if TYPE_CHECKING:
    from mlops.registry.releases import Registry
    from mlops.registry.store import Store

# What a replayed request asks: a completion prompt, or a chat case's turns (OpenAI message dicts)
Prompt = str | list[dict[str, Any]]
RELEASE_HEADER = "x-mlops-release"  # pins a request to a release (local server and gateway)


def is_error(status: int) -> bool:
    """A server-side failure (what `mlops monitor` counts): 5xx and 429; other 4xx are the client's."""
    return status >= 500 or status == 429


@dataclass
class Side:
    """One release's requests in a window."""

    release: str
    requests: int = 0  # judged: answered 2xx or failed 5xx/429 (a client's 4xx is not the release's)
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, of the answered requests
    answers: list[dict[str, Any]] = field(default_factory=list)  # the answered records (texts when captured)
    _sorted: tuple[int, list[float]] = field(default=(-1, []), repr=False, compare=False)

    def add(self, rec: dict[str, Any]) -> None:
        status = int(rec.get("status") or 0)
        if is_error(status):
            self.requests += 1
            self.errors += 1
        elif 200 <= status < 300:
            self.requests += 1
            self.latencies.append(float(rec.get("latency_s") or 0.0))
            self.answers.append(rec)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p(self, q: float) -> float:
        """A latency quantile (seconds). The sorted latencies are kept while none is added: a verdict
        asks for several quantiles of 100k requests."""
        key = len(self.latencies)
        if self._sorted[0] != key:
            self._sorted = (key, sorted(self.latencies))
        return percentile(self._sorted[1], q)

    def texts(self, nonempty: bool = False) -> list[dict[str, Any]]:
        """The answers whose output text was captured (`nonempty`: and is not empty)."""
        return [r for r in self.answers if isinstance(r.get("output"), str) and (r["output"] or not nonempty)]

    def summary(self) -> dict[str, float]:
        """The numbers a verdict records (as the older analysis did: requests, errors, rate, p50/95/99)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p50": round(self.p(0.5), 6),
            "p95": round(self.p(0.95), 6),
            "p99": round(self.p(0.99), 6),
        }


@dataclass
class LiveWindow:
    """Both releases' requests over the same [since, until]."""

    since: float
    until: float
    candidate: Side
    production: Side
    source: Literal["live", "replay"] = "live"
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # per release, mlops's own included
    capture: dict[str, int] = field(default_factory=dict)  # files read, skipped files/lines, other releases


class WindowReader:
    """Windows of one pair of releases, read again and again (the controller's every interval).
    A capture file is written once and never changes, so each is parsed once: its records of the
    two releases are kept, the others counted. Unreadable files are tried again next time."""

    def __init__(self, registry: Registry | Store, candidate: str, production: str) -> None:
        self.store: Store = registry.store if hasattr(registry, "store") else registry
        self.candidate, self.production = candidate, production
        self._files: dict[str, tuple[list[dict[str, Any]], int]] = {}  # key -> (our records, others)

    def read(
        self, since: float, until: float | None = None, counters: dict[str, dict[str, float]] | None = None
    ) -> LiveWindow:
        """The window [since, until] (until: now). A record reaches the store up to
        `monitor.flush_interval` after its request: read a window that long after `until`, or again.
        `counters`: the per-release stats of the same window (`/v1/mlops/stats`' `releases`, or
        `SharedStats.window(since)`: every request, mlops's own included), kept as context."""
        end = until if until is not None else time.time()
        w = Window(since, end)
        cand, prod = Side(self.candidate), Side(self.production)
        other = files = 0
        ours = (self.candidate, self.production)
        keys = capture_keys(self.store, since, end)
        # windows move forward (a step's start, a guardrail's checkpoint): a file that left the
        # window is not kept (a 30-minute bake held every record of it), and is parsed again if asked
        listed = set(keys)
        self._files = {k: v for k, v in self._files.items() if k in listed}
        for key in keys:
            if key not in self._files:
                try:
                    recs = list(read_records(self.store, key, w))
                except Unreadable:
                    w.skipped_files += 1
                    continue
                mine = [r for r in recs if r.get("release") in ours]
                self._files[key] = (mine, len(recs) - len(mine))
            mine, others = self._files[key]
            files += 1
            for rec in mine:
                if since <= rec["time"] <= end:
                    (cand if rec["release"] == self.candidate else prod).add(rec)
            other += others  # a file's other releases, whatever their time: context only
        capture = {"files": files, "skipped_files": w.skipped_files, "skipped_lines": w.skipped_lines, "other": other}
        return LiveWindow(since, end, cand, prod, "live", dict(counters or {}), capture)


def read_window(
    registry: Registry | Store,
    candidate: str,
    production: str,
    since: float,
    until: float | None = None,
    counters: dict[str, dict[str, float]] | None = None,
) -> LiveWindow:
    """One window from the capture records in the store (see `WindowReader.read`; one store per
    registry holds every model's captures, and release ids are the model's own)."""
    return WindowReader(registry, candidate, production).read(since, until, counters)


def _record(resp: Any, latency_s: float, prompt: str, chat: bool) -> dict[str, Any]:
    """A replayed answer in the shape of a capture record (what `Side.add` and the metrics read)."""
    rec: dict[str, Any] = {"id": "", "status": resp.status_code, "latency_s": latency_s, "prompt": prompt}
    try:
        doc = resp.json()
    except ValueError:
        doc = {}
    if resp.status_code == 200 and isinstance(doc, dict):
        choice = (doc.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = doc.get("usage") or {}
        rec |= {
            "id": str(doc.get("id") or ""),
            "output": str(text or ""),
            "output_len": len(str(text or "")),
            "prompt_len": len(prompt),
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
    return rec


def replay_window(
    base_url: str,
    prompts: list[Prompt],
    candidate: str,
    production: str,
    n: int,
    *,
    model: str,
    max_tokens: int,
    api_key: str | None = None,
    concurrency: int = 8,
    timeout: float = 60.0,
) -> LiveWindow:
    """Send the first `n` prompts (cycled) to each release, pinned by the release header, with the
    not-captured header (replay is mlops's own traffic); latency is measured by this client, the same
    way for both. A request that got no answer (timeout, connection) counts as that release's error."""
    import asyncio

    import httpx

    if not prompts:
        raise ValueError("replay needs at least one prompt")
    headers = {**NOT_CAPTURED, **({"authorization": f"Bearer {api_key}"} if api_key else {})}
    sides = {candidate: Side(candidate), production: Side(production)}
    since = time.time()

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int, release: str) -> None:
        prompt = prompts[i % len(prompts)]
        chat = not isinstance(prompt, str)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "user": f"replay-{i}"}
        body["messages" if chat else "prompt"] = prompt
        text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{base_url}{path}", json=body, headers={RELEASE_HEADER: release})
                rec = _record(r, time.perf_counter() - t0, text, chat)
            except httpx.HTTPError:
                rec = {"id": "", "status": 504, "latency_s": time.perf_counter() - t0}
        sides[release].add(rec)

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(trust_env=False, headers=headers, timeout=timeout) as client:
            # each prompt to both releases, in alternating order: neither always meets a warmer server
            pairs = [(i, r) for i in range(n) for r in ((candidate, production) if i % 2 else (production, candidate))]
            await asyncio.gather(*(one(client, sem, i, r) for i, r in pairs))

    asyncio.run(main())
    return LiveWindow(since, time.time(), sides[candidate], sides[production], "replay")
