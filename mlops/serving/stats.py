"""Live per-release request statistics, measured by the server for canary analysis and /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
        """The Prometheus text of these counters (same names and labels as before prometheus_client)."""
        with self._lock:
            items = [(k, v.total, v.errors, [r[1] for r in v.recent if r[2]]) for k, v in self._by_release.items()]
        requests = CounterMetricFamily(
            "mlops_requests", "Requests answered, by release and outcome.", labels=["release", "outcome"]
        )
        latency = Metric("mlops_request_latency_seconds", "Recent request latency.", "summary")
        for rel, total, errors, lat in items:
            requests.add_metric([rel, "ok"], total - errors)
            requests.add_metric([rel, "error"], errors)
            for q in (0.5, 0.95, 0.99):
                latency.add_sample(latency.name, {"release": rel, "quantile": str(q)}, percentile(lat, q))
            latency.add_sample(latency.name + "_count", {"release": rel}, len(lat))
        depth = GaugeMetricFamily("mlops_queue_depth", "Requests waiting for an engine.", value=queue_depth)
        rejected = CounterMetricFamily("mlops_rejected", "Requests refused with 503 (queue full).", value=self.rejected)
        released = GaugeMetricFamily("mlops_release_loaded", "Releases loaded in this server.", labels=["release"])
        for r in loaded:
            released.add_metric([r], 1)
        return render([requests, latency, depth, rejected, released])


class _Families:
    """What `generate_latest` asks of a registry: the families to write, collected now."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def render(families: list[Metric]) -> str:
    """Prometheus text exposition (format 0.0.4) of metric families built on the spot."""
    return generate_latest(_Families(families)).decode()
