"""Live per-release stats shared by every container of a serverless gateway, through a key-value
store (on Modal a `modal.Dict`; in the twin a file).

A gateway container's memory is not where canary statistics can live: Modal scales an idle gateway
to zero (a bake longer than `scaledown_window` reads a fresh container), replaces it on every
redeploy, and may run several at once. So each container keeps its own recent requests in memory,
as `LiveStats` does, and writes them under its own key (`stats:<container>`, so containers never
overwrite each other) every `FLUSH_S` seconds and when it stops. Every write ends with a heartbeat
(`beat:<container>`: the time it flushed). A reader (the `/v1/mlops/stats` route, any container)
flushes its own, then waits, bounded, until every container that is alive (a recent heartbeat) has
flushed after the moment the read began, and merges every container's rows: the canary step sees
all the traffic of its window, whichever container served it or reads it.

Other per-container documents ride on the same flush and heartbeat (`share`: the gateway's shadow
pairs, mlops/serving/shared_shadow.py), so one settled read (`gather`) sees them all at once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from mlops.util import percentile

FLUSH_S = 1.0  # how stale another container's rows may be; one small store write per second each
KEEP_S = 3600.0  # rows older than this are dropped: a canary step with its bake lasts minutes
WINDOW = 20_000  # recent requests kept per release per container (as LiveStats)
STATS, BEAT = "stats:", "beat:"

Put = Callable[[str, Any], None]
Items = Callable[[str], Mapping[str, Any]]


class SharedStats:
    """`record` on the request path (memory only); `window(since)` merges every container's rows."""

    def __init__(
        self,
        put: Put,
        items: Items,
        *,
        container: str | None = None,
        clock: Callable[[], float] = time.time,
        flush_s: float = FLUSH_S,
    ) -> None:
        self._put, self._items, self._clock, self.flush_s = put, items, clock, flush_s
        self.container = container or secrets.token_hex(6)
        self._rows: dict[str, deque[tuple[float, float, bool]]] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one write at a time: a later snapshot never lands first
        self._dirty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sections: dict[str, Callable[[], Any | None]] = {}
        self.rejected = 0

    def share(self, prefix: str, snapshot: Callable[[], Any | None]) -> None:
        """Flush `snapshot()` (None: unchanged since the last) under `prefix<container>` too, in
        every flush before the heartbeat, so a reader that waited for the heartbeat has it."""
        self._sections[prefix] = snapshot

    def record(self, release: str, latency_s: float, ok: bool) -> None:
        with self._lock:
            rows = self._rows.setdefault(release, deque(maxlen=WINDOW))
            rows.append((round(self._clock(), 4), round(latency_s, 5), ok))
            self._dirty = True

    def flush(self) -> None:
        """Write this container's rows (when there are new ones), then its heartbeat."""
        with self._flush_lock:
            now = self._clock()
            with self._lock:
                dirty, self._dirty = self._dirty, False
                for rows in self._rows.values():
                    while rows and rows[0][0] < now - KEEP_S:
                        rows.popleft()
                doc = {rel: [list(r) for r in rows] for rel, rows in self._rows.items() if rows}
            if dirty:
                self._put(STATS + self.container, doc)
            for prefix, snapshot in self._sections.items():
                if (extra := snapshot()) is not None:
                    self._put(prefix + self.container, extra)
            self._put(BEAT + self.container, now)

    def start(self) -> None:
        """Flush every `flush_s` in a thread until `stop()` (which flushes once more). The first
        heartbeat is written now: a reader waits only for containers it knows are alive, and one that
        started less than `flush_s` ago would otherwise go unwaited-for and its first rows unread."""
        try:
            self.flush()
        except Exception as e:  # the store is down at start: the loop keeps trying
            print(f"gateway: stats flush failed: {type(e).__name__}: {e}", flush=True)

        def loop() -> None:
            while not self._stop.wait(self.flush_s):  # a timer: the heartbeat others wait on
                try:
                    self.flush()
                except Exception as e:  # a store hiccup: the next flush carries the same rows
                    print(f"gateway: stats flush failed: {type(e).__name__}: {e}", flush=True)

        self._thread = threading.Thread(target=loop, daemon=True, name="stats-flush")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def gather(self, *prefixes: str) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """Every container's documents under each prefix ({prefix: {container: doc}}) and every
        container's last heartbeat, once each live one has flushed after this call began (bounded)."""
        started = self._clock()
        self.flush()
        deadline = time.monotonic() + 3 * self.flush_s
        while True:
            beats = {k.removeprefix(BEAT): float(v) for k, v in self._items(BEAT).items()}
            waiting = [c for c, t in beats.items() if started - 3 * self.flush_s < t < started]
            if not waiting or time.monotonic() > deadline:
                docs = {p: {k.removeprefix(p): v for k, v in self._items(p).items()} for p in prefixes}
                return docs, beats
            time.sleep(self.flush_s / 10)

    def alive(self, beats: Mapping[str, float]) -> set[str]:
        """The containers whose heartbeat is recent (`gather`'s beats): the ones not gone."""
        return {c for c, t in beats.items() if t > self._clock() - 3 * self.flush_s}

    def window(self, since: float = 0.0) -> dict[str, dict[str, float]]:
        """Per release: requests, errors, error_rate, p50/p95/p99 latency (s), after `since`,
        over every container."""
        return self.merge(self.gather(STATS)[0][STATS], since)

    @staticmethod
    def merge(docs: Mapping[str, Any], since: float) -> dict[str, dict[str, float]]:
        """`window` over the containers' rows `docs` ({container: rows}, as `gather` reads them)."""
        rows: dict[str, list[tuple[float, float, bool]]] = {}
        for doc in docs.values():
            for rel, rs in (doc or {}).items():
                rows.setdefault(rel, []).extend((float(t), float(lat), bool(ok)) for t, lat, ok in rs if t >= since)
        out = {}
        for rel, rs in rows.items():
            lat = [r[1] for r in rs if r[2]]
            errors = sum(1 for r in rs if not r[2])
            out[rel] = {
                "requests": len(rs),
                "errors": errors,
                "error_rate": errors / len(rs) if rs else 0.0,
                "p50": percentile(lat, 0.5),
                "p95": percentile(lat, 0.95),
                "p99": percentile(lat, 0.99),
            }
        return out
