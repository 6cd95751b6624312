"""Loss accounting: every request the server answers on a captured route is captured or counted lost.

The capture writer counts, per minute of request time, the requests the server answered and what
became of each: `captured` (its record was written), or lost with the reason:

- `queue_full`: the writer's queue (or its byte budget) had no room;
- `sample`: left out by `monitor.sample_rate` (on purpose: not counted in the loss rate);
- `encode`: the record could not be built or encoded;
- `write`: the storage refused the batch (after retries): disk full, a path that is not a directory.

The counts are kept in memory and written as one small side file per writer and hour, rewritten
after each batch and every flush interval, so a failed write loses no count: it goes out with the
next write that succeeds (the side file lives outside `monitor/capture/`, whose disk may be the
one that failed):

    monitor/counters/<UTC date>/<hour start>-<source>-<writer id>.json
    {"v": 1, "writer", "source", "updated", "last_error", "minutes": {"<minute start>": {...}}}

`mlops monitor` sums the minutes of its window (windows start on a whole minute, so the counts
and the records cover the same requests).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from typing import Any

COUNTERS_PREFIX = "monitor/counters"
LOST = ("queue_full", "sample", "encode", "write")
FIELDS = ("answered", "captured", *LOST)
KEEP_S = 3 * 3600  # minutes this much older than the newest (and written) leave memory: no request waits that long


def hour_of(t: float) -> int:
    return int(t // 3600) * 3600


def counters_key(hour: int, source: str, writer: str) -> str:
    day = dt.datetime.fromtimestamp(hour, dt.UTC).strftime("%Y-%m-%d")
    return f"{COUNTERS_PREFIX}/{day}/{hour}-{source}-{writer}.json"


class Tally:
    """Thread-safe counts per minute; `flush(store)` writes the hours that changed."""

    def __init__(self, source: str, writer: str) -> None:
        self.source, self.writer = source, writer
        self._lock = threading.Lock()
        self._minutes: dict[int, dict[str, int]] = {}
        self._dirty: set[int] = set()  # hours whose side file is behind memory
        self.last_error: str | None = None  # why the last write failed (no path: it may hold a secret)

    def add(self, t: float, field: str, n: int = 1) -> None:
        minute = int(t // 60) * 60
        with self._lock:
            b = self._minutes.get(minute)
            if b is None:
                b = self._minutes[minute] = dict.fromkeys(FIELDS, 0)
            b[field] += n
            self._dirty.add(hour_of(minute))

    def totals(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(FIELDS, 0)
            for b in self._minutes.values():
                for k, v in b.items():
                    out[k] += v
            return out

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self, store: Any) -> None:
        """Write each changed hour's side file; an hour that fails stays dirty (raises the first error)."""
        with self._lock:
            hours, self._dirty = self._dirty, set()
            docs = {h: {str(m): dict(b) for m, b in self._minutes.items() if h <= m < h + 3600} for h in sorted(hours)}
        error: Exception | None = None
        for h, minutes in docs.items():
            doc = {
                "v": 1,
                "writer": self.writer,
                "source": self.source,
                "updated": round(time.time(), 3),
                "last_error": self.last_error,
                "minutes": minutes,
            }
            try:
                store.put(counters_key(h, self.source, self.writer), json.dumps(doc, separators=(",", ":")).encode())
            except Exception as e:
                with self._lock:
                    self._dirty.add(h)
                error = error or e
        with self._lock:  # memory stays bounded on a server that runs for months
            cutoff = max(self._minutes, default=0) - KEEP_S
            for m in [m for m in self._minutes if m < cutoff and hour_of(m) not in self._dirty]:
                del self._minutes[m]
        if error is not None:
            raise error
