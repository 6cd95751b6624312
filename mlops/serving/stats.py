"""Live per-release request statistics, measured by the server for canary analysis and /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from mlops.util import percentile

WINDOW = 20_000  # recent requests kept per release: enough for any analysis step, bounded memory


@dataclass
class _Series:
    total: int = 0
    errors: int = 0
    recent: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=WINDOW))


class LiveStats:
    def __init__(self) -> None:
        self._by_release: dict[str, _Series] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # 503s from a full queue
        self.started = time.time()

    def record(self, release: str, latency_s: float, ok: bool) -> None:
        with self._lock:
            s = self._by_release.setdefault(release, _Series())
            s.total += 1
            s.errors += 0 if ok else 1
            s.recent.append((time.time(), latency_s, ok))

    def window(self, since: float = 0.0) -> dict[str, dict[str, float]]:
        """Per release: requests, errors, error_rate, p50/p95/p99 latency (s), for requests after `since`."""
        with self._lock:
            snap = {k: list(v.recent) for k, v in self._by_release.items()}
        out = {}
        for rel, rows in snap.items():
            rows = [r for r in rows if r[0] >= since]
            lat = [r[1] for r in rows if r[2]]
            errors = sum(1 for r in rows if not r[2])
            out[rel] = {
                "requests": len(rows),
                "errors": errors,
                "error_rate": errors / len(rows) if rows else 0.0,
                "p50": percentile(lat, 0.5),
                "p95": percentile(lat, 0.95),
                "p99": percentile(lat, 0.99),
            }
        return out

    def prometheus(self, queue_depth: int, loaded: list[str]) -> str:
        lines = [
            "# HELP mlops_requests_total Requests answered, by release and outcome.",
            "# TYPE mlops_requests_total counter",
        ]
        with self._lock:
            items = [(k, v.total, v.errors, [r[1] for r in v.recent if r[2]]) for k, v in self._by_release.items()]
        for rel, total, errors, _ in items:
            lines.append(f'mlops_requests_total{{release="{rel}",outcome="ok"}} {total - errors}')
            lines.append(f'mlops_requests_total{{release="{rel}",outcome="error"}} {errors}')
        lines += [
            "# HELP mlops_request_latency_seconds Recent request latency.",
            "# TYPE mlops_request_latency_seconds summary",
        ]
        for rel, _, _, lat in items:
            for q in (0.5, 0.95, 0.99):
                lines.append(
                    f'mlops_request_latency_seconds{{release="{rel}",quantile="{q}"}} {percentile(lat, q):.6f}'
                )
            lines.append(f'mlops_request_latency_seconds_count{{release="{rel}"}} {len(lat)}')
        lines += [
            "# TYPE mlops_queue_depth gauge",
            f"mlops_queue_depth {queue_depth}",
            "# TYPE mlops_rejected_total counter",
            f"mlops_rejected_total {self.rejected}",
            "# TYPE mlops_release_loaded gauge",
            *[f'mlops_release_loaded{{release="{r}"}} 1' for r in loaded],
        ]
        return "\n".join(lines) + "\n"
