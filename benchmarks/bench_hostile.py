"""Hostile traffic: p99 of normal requests while 1 in 50 requests is hostile, over p99 without them.

    python benchmarks/bench_hostile.py [--steps 40] [--requests 1000] [--reps 3] [--clients 16]

Trains one release of the shipped example's architecture briefly in a temporary copy of the
example project, starts `mlops serve` (the real CLI, its own process) on a free 127.0.0.1 port,
and drives it from this process with `--clients` keep-alive connections (bench_serving's lean
client). Each phase sends `--requests` normal completions; in a hostile phase every 50th request
in the schedule is also a hostile one, cycling through: a 2 MB body (413), a 500 KB prompt within
the body limit but far beyond the context (400), `seed: 1e30`, `temperature: NaN`, `max_tokens:
Infinity`, 100k nested `[`, a lone surrogate in the prompt (400 each), and `temperature: 1e-300`
(valid: served). Hostile requests go on a fresh connection each (a 413 closes its connection).
Clean and hostile phases are interleaved `--reps` times. Target: p99 of the normal requests with
hostile ones over p99 without them <= 1.5, and no normal request failed.

Everything is bounded (request counts, a deadline per phase) and the server is stopped before the
script exits. Prints a table and the ratio.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import example_release, load_avg, load_options, mlops_serve, pct, prompts  # noqa: E402
from bench_serving import RawConn  # noqa: E402

EVERY = 50  # one request in this many is hostile
MAX_TOKENS = 8
HOSTILE: list[tuple[str, bytes]] = [
    ("2 MB body", json.dumps({"prompt": "a" * 2_000_000}).encode()),
    ("500 KB prompt", json.dumps({"prompt": "ab" * 250_000}).encode()),
    ("seed 1e30", b'{"prompt": "x=", "temperature": 1.0, "seed": 1e30, "max_tokens": 8}'),
    ("temperature NaN", b'{"prompt": "x=", "temperature": NaN}'),
    ("max_tokens Infinity", b'{"prompt": "x=", "max_tokens": Infinity}'),
    ("100k nested [", b"[" * 100_000),
    ("lone surrogate", b'{"prompt": "\\ud800=", "max_tokens": 8}'),
    ("temperature 1e-300", b'{"prompt": "x=", "temperature": 1e-300, "max_tokens": 8}'),
]


async def send_raw(url: str, data: bytes) -> int:
    """One hostile request on its own connection; its status (0: the connection failed)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        r, w = await asyncio.open_connection(host, int(port))
        head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        w.write(head.encode() + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data) + data)
        status = int((await r.readuntil(b"\r\n")).split(b" ", 2)[1])
        w.close()
        return status
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return 0


async def phase(url: str, bodies: list[str], clients: int, hostile: bool, deadline: float) -> dict[str, Any]:
    """`bodies` as normal requests from `clients` connections; with `hostile`, one in EVERY more."""
    schedule: list[tuple[str, Any]] = []
    kinds = itertools.cycle(HOSTILE)
    for i, prompt in enumerate(bodies):
        schedule.append(("normal", {"prompt": prompt, "max_tokens": MAX_TOKENS}))
        if hostile and i % EVERY == EVERY - 1:
            schedule.append(("hostile", next(kinds)))
    queue = iter(schedule)
    lat: list[float] = []
    failed = 0
    statuses: dict[str, list[int]] = {}

    async def client() -> None:
        nonlocal failed
        conn = RawConn(url)
        try:
            for kind, item in queue:
                if time.monotonic() > deadline:
                    raise SystemExit("phase ran past its deadline")
                if kind == "hostile":
                    statuses.setdefault(item[0], []).append(await send_raw(url, item[1]))
                    continue
                t0 = time.perf_counter()
                status, _, _ = await conn.post("/v1/completions", item)
                lat.append(time.perf_counter() - t0)
                failed += status != 200
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat), "failed": failed, "rps": len(lat) / wall,
            "statuses": statuses}  # fmt: skip


def main() -> None:
    ap = load_options(
        __doc__, requests=(1000, "normal requests per phase"), reps=(3, "interleaved clean/hostile pairs")
    )
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()

    with example_release("bench-hostile-", args.steps) as (root, _, rid, took):
        print(f"trained {rid} ({args.steps} steps) in {took:.1f}s")
        print(f"load average at start: {load_avg()} on {os.cpu_count()} cores; {args.clients} clients")
        gc.collect()
        gc.freeze()  # this process trained with torch: keep its collections out of the latencies
        bodies = prompts(args.requests)
        runs: dict[str, list[dict[str, Any]]] = {"clean": [], "hostile": []}
        with mlops_serve(root) as url:
            asyncio.run(phase(url, bodies[:200], args.clients, False, time.monotonic() + 60))  # warm up
            for rep in range(args.reps):
                for name in ("clean", "hostile") if rep % 2 == 0 else ("hostile", "clean"):
                    deadline = time.monotonic() + args.max_seconds
                    runs[name].append(asyncio.run(phase(url, bodies, args.clients, name == "hostile", deadline)))

    print(f"\n| phase ({args.requests} normal requests, {args.clients} clients) | req/s | p50 ms | p99 ms | failed |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            print(f"| {name} #{i + 1} | {r['rps']:.0f} | {r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {r['failed']} |")
    statuses: dict[str, set[int]] = {}
    for r in runs["hostile"]:
        for kind, got in r["statuses"].items():
            statuses.setdefault(kind, set()).update(got)
    print("\nhostile answers: " + ", ".join(f"{k} -> {sorted(v)}" for k, v in statuses.items()))
    clean = sorted(r["p99"] for r in runs["clean"])[len(runs["clean"]) // 2]
    hostile = sorted(r["p99"] for r in runs["hostile"])[len(runs["hostile"]) // 2]
    failed = sum(r["failed"] for rs in runs.values() for r in rs)
    pairs = [h["p99"] / c["p99"] for c, h in zip(runs["clean"], runs["hostile"], strict=True)]
    print(f"normal requests failed: {failed} (target 0)")
    print(f"p99 with 1 in {EVERY} hostile / without (medians of {args.reps}): {hostile * 1e3:.1f} / "
          f"{clean * 1e3:.1f} ms = **{hostile / clean:.2f}** (target <= 1.5; per pair "
          f"{', '.join(f'{p:.2f}' for p in pairs)})")  # fmt: skip


if __name__ == "__main__":
    main()
