"""Listing releases from the index against reading every manifest and history (issue 11).

A local-directory registry of N releases with M events each. Each listing runs alternately R
times; printed: objects read (`store.get` calls) and median wall time of

    list()            what `mlops releases` reads now: one small index entry per release
    list(full=True)   what every listing read before (and `--json` still does): manifest + history
    first list() of the same registry in the old layout (history.json): it rebuilds each index
                      entry once, and the next list() reads the index alone again

    python benchmarks/bench_registry.py [--releases 200] [--events 12] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlops.registry.releases import Registry  # noqa: E402
from mlops.registry.store import Blob, LocalStore, Store  # noqa: E402


class Counting:
    """The real store, with every `get` counted."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.uri, self.gets = inner, inner.uri, 0

    def get(self, key: str) -> Blob | None:
        self.gets += 1
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build(root: Path, releases: int, events: int) -> Registry:
    art = root / "art"
    art.mkdir(parents=True)
    (art / "model.safetensors").write_bytes(b"w" * 64)
    reg = Registry(LocalStore(root / "store"))
    for i in range(releases):
        rid = f"r{i:05d}"
        reg.publish(rid, art, {"model": "tiny", "created_at": f"2026-01-01T00:00:{i % 60:02d}.{i:06d}Z"})
        for j in range(events - 1):
            reg.append_event(rid, "canary_step", by="bench", percent=j, candidate={"p95": 0.01 * j})
    return reg


def to_old_layout(root: Path) -> None:
    """Each release's events as one history.json, index entries without status (older registries)."""
    store = root / "store"
    for rel in (store / "releases").iterdir():
        hist = [json.loads(p.read_text()) for p in sorted((rel / "events").glob("*.json"))]
        shutil.rmtree(rel / "events")
        (rel / "history.json").write_text(json.dumps(hist, indent=2, sort_keys=True))
    for p in (store / "index" / "releases").glob("*.json"):
        e = json.loads(p.read_text())
        p.write_text(json.dumps({k: e[k] for k in ("id", "model", "created_at", "fingerprint")}))


def timed(reg: Registry, counting: Counting, full: bool) -> tuple[float, int]:
    counting.gets = 0
    t0 = time.perf_counter()
    reg.list(full=full)
    return time.perf_counter() - t0, counting.gets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--releases", type=int, default=200)
    ap.add_argument("--events", type=int, default=12)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.releases, args.events)
        counting = Counting(LocalStore(root / "store"))
        reg = Registry(counting)  # type: ignore[arg-type]
        index, scan = [], []
        for _ in range(args.runs):
            index.append(timed(reg, counting, False))
            scan.append(timed(reg, counting, True))
        ti, gi = statistics.median(t for t, _ in index), index[-1][1]
        ts, gs = statistics.median(t for t, _ in scan), scan[-1][1]
        print(f"{args.releases} releases x {args.events} events, median of {args.runs}")
        print(f"list() (index)                 {gi:6d} reads  {ti * 1000:8.1f} ms")
        print(f"list(full=True) (every file)   {gs:6d} reads  {ts * 1000:8.1f} ms   ratio {ts / ti:.1f}x")
        to_old_layout(root)
        first = timed(reg, counting, False)
        again = timed(reg, counting, False)
        print(f"old layout: first list()       {first[1]:6d} reads  {first[0] * 1000:8.1f} ms (rebuilds the index)")
        print(f"old layout: next list()        {again[1]:6d} reads  {again[0] * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
