"""Serving under load: batched throughput, and 20 rollbacks/promotions under 32 concurrent clients.

    python benchmarks/bench_serving.py [--steps 40] [--requests 200] [--reps 3] [--flips 20]

Trains two releases of the shipped example's architecture (n_layer 3, n_embd 128) briefly in a
temporary copy of the example project, starts `mlops serve` (the real CLI, its own process) on a
free 127.0.0.1 port, and measures from this process with httpx.AsyncClient:

(ii) throughput on the same model: `--requests` completions of 6-10 character inputs (up to 8
     tokens each) one at a time (c=1), then at concurrency 16, interleaved `--reps` times; and, on a
     second server started with `deploy.server.max_batch_size=1`, at concurrency 16 with batching
     off. Target: c=16 over c=1 >= 3.
(i)  load test: 32 clients send completions continuously; a steady phase, then `--flips` state
     writes alternate production between the two releases (the registry's compare-and-swap, as
     `mlops rollback` does). For each flip: the time from the decision (just before the state write)
     to the first response served by the new target, as the clients see it (target p99 <= 100 ms);
     failed requests (target 0); p99 latency of requests started during the flips over p99 in the
     steady phase (target <= 1.5).

Everything is bounded: request counts are fixed, every phase has a deadline (--max-seconds), and
the servers are stopped before the script exits. Prints a table and the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import load_avg, load_options, make_project, mlops_serve, pct, prompts, train_release  # noqa: E402

from mlops.config import load  # noqa: E402
from mlops.pipeline import Session  # noqa: E402
from mlops.registry.releases import Registry, State  # noqa: E402

H = "x-mlops-release"
MAX_TOKENS = 8
WARMUP = 300  # requests before the steady phase is measured (connections, first batches)


# --------------------------------------------------------------------------- clients


class RawConn:
    """One keep-alive HTTP/1.1 connection speaking just enough to POST JSON (like wrk or hey).

    The default load generator: on this 2-core machine httpx.AsyncClient spends more CPU per
    request than the server does and, at 32 connections, adds a client-side tail of its own
    (measured: p99 185-245 ms with httpx against 65-80 ms with this, for a server-side p99 of
    60-100 ms). `--client httpx` runs the same benchmark with httpx."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        assert self.r is not None
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
        self.w.write(head.encode() + b"content-length: %d\r\n\r\n" % len(data) + data)
        lines = (await self.r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        payload = await self.r.readexactly(int(headers.get("content-length", "0")))
        return status, headers.get(H, ""), payload

    async def close(self) -> None:
        if self.w is not None:
            self.w.close()


class HttpxConn:
    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client, self.url = client, url

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
        r = await self.client.post(f"{self.url}{path}", json=body)
        return r.status_code, r.headers.get(H, ""), r.content

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def connections(url: str, n: int, kind: str) -> AsyncIterator[list[RawConn] | list[HttpxConn]]:
    if kind == "raw":
        raw = [RawConn(url) for _ in range(n)]
        try:
            yield raw
        finally:
            for c in raw:
                await c.close()
        return
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        yield [HttpxConn(client, url) for _ in range(n)]


CLIENT = "raw"


# --------------------------------------------------------------------------- (ii) throughput


async def fixed_load(url: str, bodies: list[str], concurrency: int, deadline: float) -> dict[str, float]:
    """Send every prompt once with `concurrency` clients; req/s and latency."""
    lat: list[float] = []
    tokens: list[int] = []
    failed = 0
    todo = iter(bodies)
    async with connections(url, concurrency, CLIENT) as conns:

        async def worker(conn: RawConn | HttpxConn) -> None:
            nonlocal failed
            for p in todo:
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
                status, _, payload = await conn.post("/v1/completions", body)
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    failed += 1
                else:
                    tokens.append(json.loads(payload)["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - t0
    return {
        "rps": len(lat) / wall,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "failed": failed,
        "tokens": statistics.mean(tokens) if tokens else 0.0,
        "n": len(lat),
    }


# --------------------------------------------------------------------------- (i) flips under load


@dataclass
class Flip:
    target: str
    at: float  # perf_counter just before the state write
    written: float = 0.0  # perf_counter once the write returned
    first: float | None = None  # perf_counter of the first response the new target served


@dataclass
class LoadResult:
    rows: list[tuple[float, float, str, int]] = field(default_factory=list)  # start, end, release, status
    errors: list[str] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)
    steady_start: float = 0.0
    steady_wall: float = 0.0
    flips_wall: float = 0.0
    server_steady: dict[str, Any] = field(default_factory=dict)  # the server's own /v1/mlops/stats
    server_flips: dict[str, Any] = field(default_factory=dict)


def flip_to(reg: Registry, target: str, other: str) -> None:
    def change(st: State) -> State:
        st.stages["production"], st.stages["previous"] = target, other
        st.stages["canary"] = st.stages["candidate"] = None
        st.routing, st.shadow = {target: 100}, {}
        return st

    reg.update_state(change, reason=f"bench: flip to {target}", actor="bench")


async def flips_under_load(
    url: str, reg: Registry, a: str, b: str, clients: int, steady: int, flips: int, gap: float, deadline: float
) -> tuple[LoadResult, float, float]:
    """Clients run throughout; `steady` requests first, then `flips` state writes `gap` apart."""
    res = LoadResult()
    stop = asyncio.Event()
    bodies = prompts(4096, seed=1)
    counter = iter(range(10**9))
    async with connections(url, clients, CLIENT) as conns, httpx.AsyncClient(trust_env=False) as client:

        async def worker(w: int) -> None:
            conn = conns[w]
            while not stop.is_set() and time.monotonic() < deadline:
                i = next(counter)
                t0 = time.perf_counter()
                body = {"model": "tiny", "prompt": bodies[i % len(bodies)], "max_tokens": MAX_TOKENS,
                        "user": f"client-{w}-{i}"}  # fmt: skip
                try:
                    status, rel, payload = await conn.post("/v1/completions", body)
                    res.rows.append((t0, time.perf_counter(), rel, status))
                    if status != 200:
                        res.errors.append(f"{status} {payload[:120]!r}")
                except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as e:
                    res.rows.append((t0, time.perf_counter(), "", 0))
                    res.errors.append(f"{type(e).__name__}: {e}")
                    return

        tasks = [asyncio.create_task(worker(w)) for w in range(clients)]
        while len(res.rows) < WARMUP and time.monotonic() < deadline:  # connections opened, batch full
            await asyncio.sleep(0.01)
        res.steady_start, res.steady_wall = time.perf_counter(), time.time()
        while len(res.rows) < WARMUP + steady and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        res.server_steady = (await client.get(f"{url}/v1/mlops/stats", params={"since": res.steady_wall})).json()
        res.flips_wall = time.time()
        steady_end = time.perf_counter()
        targets = [b, a] * flips
        for k in range(flips):
            target = targets[k]
            other = a if target == b else b
            f = Flip(target, time.perf_counter())
            res.flips.append(f)
            await asyncio.to_thread(flip_to, reg, target, other)
            f.written = time.perf_counter()
            await asyncio.sleep(gap)
        flips_end = time.perf_counter()
        res.server_flips = (await client.get(f"{url}/v1/mlops/stats", params={"since": res.flips_wall})).json()
        stop.set()
        await asyncio.gather(*tasks)
    # the first response the new target served: among requests sent after the decision (so routed
    # by the new state), the one that finished first; conservative, it ignores requests sent just
    # before the write that the server routed after it
    for k, f in enumerate(res.flips):
        until = res.flips[k + 1].at if k + 1 < len(res.flips) else float("inf")
        ends = [end for start, end, rel, st in res.rows if rel == f.target and st == 200 and f.at <= start < until]
        f.first = min(ends, default=None)
    return res, steady_end, flips_end


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = load_options(
        __doc__,
        requests=(200, "requests per throughput run"),
        reps=(3, "interleaved repetitions of the throughput runs"),
    )
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between two flips")
    ap.add_argument("--steady", type=int, default=1500, help="requests in the steady phase")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw", help="the load generator (see RawConn)")
    args = ap.parse_args()
    global CLIENT
    CLIENT = args.client

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        root = make_project(tmp, args.steps)
        _, a, ta = train_release(root)
        _, b, tb = train_release(root, ["models.tiny.train.seed=1"])  # production b, previous a: both preloaded
        print(f"trained {a} and {b} ({args.steps} steps each) in {ta + tb:.1f}s")
        print(f"load average at start: {load_avg()} on {os.cpu_count()} cores; client: {CLIENT}")
        # this process trained with torch: freeze those objects so that the load generator's own
        # garbage collections do not show up as server latency (the server does the same)
        gc.collect()
        gc.freeze()

        # (ii) throughput -----------------------------------------------------------------
        bodies = prompts(args.requests)
        runs: dict[str, list[dict[str, float]]] = {"c1": [], "c16": [], "c16-nobatch": []}
        with mlops_serve(root) as url:
            asyncio.run(fixed_load(url, bodies[:64], 16, time.monotonic() + 60))  # warm up
            for rep in range(args.reps):
                order = ["c1", "c16"] if rep % 2 == 0 else ["c16", "c1"]
                for name in order:
                    conc = 1 if name == "c1" else 16
                    runs[name].append(asyncio.run(fixed_load(url, bodies, conc, time.monotonic() + args.max_seconds)))
        with mlops_serve(root, "deploy.server.max_batch_size=1") as url:
            asyncio.run(fixed_load(url, bodies[:64], 16, time.monotonic() + 60))
            for _ in range(args.reps):
                runs["c16-nobatch"].append(
                    asyncio.run(fixed_load(url, bodies, 16, time.monotonic() + args.max_seconds))
                )

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[name])

        # (i) flips under load ------------------------------------------------------------
        reg = Session.open(load(root / "mlops.yaml")).registry
        with mlops_serve(root) as url:
            asyncio.run(fixed_load(url, bodies[:64], 16, time.monotonic() + 60))
            res, steady_end, flips_end = asyncio.run(
                flips_under_load(url, reg, a, b, args.clients, args.steady, args.flips, args.gap,
                                 time.monotonic() + args.max_seconds)
            )  # fmt: skip
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        first = res.flips[0].at
        steady_lat = [e - s0 for s0, e, _, st in res.rows if res.steady_start <= s0 < first and st == 200]
        flip_lat = [e - s0 for s0, e, _, st in res.rows if first <= s0 <= flips_end and st == 200]
        to_first = [(f.first - f.at) for f in res.flips if f.first is not None]
        after_write = [(f.first - f.written) for f in res.flips if f.first is not None]
        missing = sum(1 for f in res.flips if f.first is None)
        write_ms = [(f.written - f.at) * 1000 for f in res.flips]
        failed = len(res.errors)
        loads = [ln for ln in metrics.splitlines() if ln.startswith("mlops_model_loads_total")]

        # report ---------------------------------------------------------------------------
        print(f"load average at end:   {load_avg()}")
        print()
        print(f"(ii) throughput, {args.requests} requests of 6-10 characters, up to {MAX_TOKENS} tokens "
              f"(median of {args.reps}; mean completion {med('c16', 'tokens'):.1f} tokens)")  # fmt: skip
        print(f"  {'':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for name, label in [
            ("c1", "one request at a time (c=1)"),
            ("c16-nobatch", "c=16, batching off (batch 1)"),
            ("c16", "c=16, continuous batching"),
        ]:
            print(f"  {label:34} {med(name, 'rps'):8.1f} {med(name, 'p50') * 1000:8.1f} {med(name, 'p99') * 1000:8.1f}")
        ratio = med("c16", "rps") / med("c1", "rps")
        ratio_nb = med("c16", "rps") / med("c16-nobatch", "rps")
        print(f"  ratio c=16 batched / c=1:        {ratio:5.2f}  (target >= 3)")
        print(f"  ratio c=16 batched / unbatched:  {ratio_nb:5.2f}")
        print()
        print(f"(i) load test: {args.clients} clients, {args.flips} flips {args.gap * 1000:.0f} ms apart, "
              f"{len(res.rows)} requests")  # fmt: skip
        print(f"  failed requests:                         {failed}  (target 0)")
        if res.errors:
            print(f"    e.g. {res.errors[0]}")
        print(f"  decision -> first response of new target: p50 {pct(to_first, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(to_first, 0.99) * 1000:.1f} ms, max {max(to_first, default=float('nan')) * 1000:.1f} ms"
              f"  (target p99 <= 100 ms){f'; {missing} flips never answered' if missing else ''}")  # fmt: skip
        print(f"    ... from the end of the state write:    p50 {pct(after_write, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(after_write, 0.99) * 1000:.1f} ms (the write, with fsync: p50 {pct(write_ms, 0.5):.1f} ms)")  # fmt: skip
        p99s, p99f = pct(steady_lat, 0.99), pct(flip_lat, 0.99)
        print(f"  p99 latency steady / during flips:       {p99s * 1000:.1f} ms ({len(steady_lat)} req) / "
              f"{p99f * 1000:.1f} ms ({len(flip_lat)} req)")  # fmt: skip
        print(f"  ratio during flips / steady:             {p99f / p99s:5.2f}  (target <= 1.5)")

        def server_p99(doc: dict[str, Any]) -> str:
            rel = doc.get("releases", {})
            return ", ".join(f"{k[-6:]} {v['p99'] * 1000:.1f} ms ({v['requests']})" for k, v in sorted(rel.items()))

        print(f"  server-side p99 steady:                  {server_p99(res.server_steady)}")
        print(f"  server-side p99 during flips:            {server_p99(res.server_flips)}")
        print(f"  model loads during the run:              {', '.join(ln.split('_total')[1] for ln in loads)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
