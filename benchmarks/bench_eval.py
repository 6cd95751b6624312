"""Eval harness overhead: `run_suite` wall time over raw httpx.AsyncClient requests for the same cases.

    python benchmarks/bench_eval.py [--n 200] [--reps 7] [--steps 30]

Trains the shipped example architecture briefly in a temporary copy of the example project,
serves it in-thread on a free port (mlops.serving.runner.serve_in_thread), and then, interleaved
`--reps` times (alternating which goes first):

- raw: the same N request bodies through one httpx.AsyncClient at the suite's concurrency, with
  a semaphore and nothing else (parse the text, keep it);
- harness: `run_suite` end to end with an empty cache (cases, metrics, requests with timeouts and
  retries, cache writes, scoring, the result document).

Reports the median of the per-pair ratios harness/raw (target <= 1.10), and the wall time of an
unchanged rerun (every answer from the cache) over the first run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import example_release  # noqa: E402

from mlops.evals.harness import Endpoint, load_cases, run_suite  # noqa: E402
from mlops.serving.runner import serve_in_thread  # noqa: E402

SUITE = "heldout"


def with_cases(n: int) -> Callable[[dict[str, Any], Path], None]:
    """Edit the example's config to score exact match and latency on `n` cases of the heldout suite."""

    def edit(cfg: dict[str, Any], root: Path) -> None:
        cfg["evals"][SUITE]["metrics"] = ["exact_match", "latency"]
        if n != 200:  # more (or fewer) cases: the shipped inputs again, under new ids
            rows = [json.loads(x) for x in (root / "evals" / "heldout.jsonl").read_text().splitlines() if x.strip()]
            out = [r | {"id": f"{r['id']}-{k // len(rows)}"} for k, r in ((k, rows[k % len(rows)]) for k in range(n))]
            (root / "evals" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
            cfg["datasets"][SUITE]["path"] = "evals/bench.jsonl"

    return edit


async def raw(url: str, bodies: list[dict[str, Any]], release: str, concurrency: int, timeout: float) -> list[str]:
    """The floor: the same requests with a bare client and a semaphore."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"x-mlops-release": release}
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=timeout) as client:

        async def one(body: dict[str, Any]) -> str:
            async with sem:
                r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="cases (>= 200 for the issue's figure)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the example model")
    args = ap.parse_args()

    with example_release("bench-eval-", args.steps, with_cases(args.n)) as (root, s, rid, took):
        loaded = s.loaded
        print(f"trained {rid} ({args.steps} steps, {took:.1f}s)", file=sys.stderr)
        ev = loaded.cfg.evals[SUITE]
        model = loaded.cfg.models["tiny"]
        cases = load_cases(loaded, SUITE)
        with serve_in_thread(loaded, s.registry) as url:
            ep = Endpoint(url, rid, model.prompt, model.max_tokens, ev.concurrency, ev.timeout, ev.retries)
            bodies = [ep.body(c) for c in cases]
            asyncio.run(raw(url, bodies, rid, ev.concurrency, ev.timeout))  # warm: load weights, JIT paths
            raw_s, harness_s, rerun_s = [], [], []
            for rep in range(args.reps):
                cache = root.parent / f"cache-{rep}"
                order = ("raw", "harness") if rep % 2 == 0 else ("harness", "raw")
                for what in order:
                    t0 = time.perf_counter()
                    if what == "raw":
                        texts = asyncio.run(raw(url, bodies, rid, ev.concurrency, ev.timeout))
                        raw_s.append(time.perf_counter() - t0)
                        assert len(texts) == len(cases)
                    else:
                        res = run_suite(loaded, SUITE, rid, url, cache)
                        harness_s.append(time.perf_counter() - t0)
                        assert res.cost.endpoint_calls == len(cases) and res.cost.errors == 0
                t0 = time.perf_counter()
                again = run_suite(loaded, SUITE, rid, url, cache)  # unchanged rerun: all from the cache
                rerun_s.append(time.perf_counter() - t0)
                assert again.cost.endpoint_calls == 0

    ratios = [h / r for h, r in zip(harness_s, raw_s, strict=True)]
    rerun_ratios = [r2 / h for r2, h in zip(rerun_s, harness_s, strict=True)]
    med = statistics.median(ratios)
    print(f"\neval harness overhead: N={len(cases)} cases, concurrency {ev.concurrency}, {args.reps} interleaved reps")
    print(f"{'':28}{'median':>10}{'min':>10}{'max':>10}")
    for name, xs in (
        ("raw httpx (s)", raw_s),
        ("harness run_suite (s)", harness_s),
        ("harness / raw", ratios),
        ("unchanged rerun (s)", rerun_s),
        ("rerun / first run", rerun_ratios),
    ):
        print(f"{name:28}{statistics.median(xs):>10.3f}{min(xs):>10.3f}{max(xs):>10.3f}")
    print(f"\nharness overhead ratio (median) {med:.3f}  target <= 1.10  {'OK' if med <= 1.10 else 'MISSED'}")
    print(f"unchanged rerun / first run (median) {statistics.median(rerun_ratios):.3f}  (0 endpoint calls)")


if __name__ == "__main__":
    main()
