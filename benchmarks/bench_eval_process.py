"""The whole `mlops eval` process (start-up included) over a raw httpx.AsyncClient loop, both against a
50 ms stub endpoint, the same cases at the same concurrency (issue 16's eval-overhead check).

    python benchmarks/bench_eval_process.py [--n 200] [--reps 5] [--latency 0.05] [--profile] [--before DIR]

The stub (Starlette under uvicorn, in a thread of this process) answers every completion after
`--latency` seconds. In a temporary copy of the example project, with a release registered (no
training: the stub answers for it) and a suite of N cases scored with exact_match and latency,
interleaved `--reps` times (alternating which goes first), each a fresh process:

- raw: `python -c` with a bare httpx.AsyncClient, a semaphore of the suite's concurrency, the same
  request bodies; parse each text and keep it;
- eval: `mlops eval --release R --url STUB --json` with an empty eval cache: configuration,
  registry, harness, metrics, the result stored with the release, gates, the JSON printed.

Prints the median of the per-pair ratios eval/raw (goal <= 1.5). `--before DIR` adds a third arm
to each round, `mlops eval` from another checkout (say `git archive` of an older commit), so a
change is measured before and after in one run, under the same load. `--profile` also writes where one
`mlops eval` process spends its time: `python -X importtime` (the slowest imports) and cProfile
(the functions with the most cumulative time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port, load_avg, make_project  # noqa: E402

SUITE = "heldout"
RELEASE = "tiny-20260101-000000-bench0"

RAW = r"""
import asyncio, json, sys
import httpx

url, path, concurrency, release = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(x) for x in open(path) if x.strip()]
bodies = [{"model": release, "prompt": r["input"] + "=", "max_tokens": 32, "temperature": 0} for r in rows]

async def main():
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=30) as client:
        async def one(body):
            async with sem:
                r = await client.post(url + "/v1/completions", json=body, headers={"x-mlops-release": release})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        return await asyncio.gather(*(one(b) for b in bodies))

texts = asyncio.run(main())
assert len(texts) == len(bodies)
"""


@contextmanager
def stub(latency: float) -> Iterator[str]:
    """An OpenAI-compatible completions endpoint that answers (the reversed prompt) after `latency` s."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        await asyncio.sleep(latency)
        text = str(body["prompt"]).removesuffix("=")[::-1]
        release = request.headers.get("x-mlops-release", "")
        return JSONResponse(
            {"choices": [{"index": 0, "text": text}], "usage": {"completion_tokens": len(text)}},
            headers={"x-mlops-release": release},
        )

    port = free_port()
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # bounded wait for the socket
        if time.monotonic() > deadline:
            raise RuntimeError("stub did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def project(root: Path, n: int, concurrency: int) -> Path:
    """The example project with N cases in the suite and one release registered (a placeholder artifact)."""

    def edit(cfg: dict, root: Path) -> None:  # type: ignore[type-arg]
        rows = [json.loads(x) for x in (root / "evals" / "heldout.jsonl").read_text().splitlines() if x.strip()]
        out = [rows[k % len(rows)] | {"id": f"case-{k:05d}"} for k in range(n)]
        (root / "evals" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
        cfg["datasets"][SUITE]["path"] = "evals/bench.jsonl"
        cfg["evals"] = {
            SUITE: cfg["evals"][SUITE] | {"metrics": ["exact_match", "latency"], "concurrency": concurrency}
        }
        cfg["gates"] = [g for g in cfg["gates"] if g["eval"] == SUITE and g["metric"] in ("exact_match", "latency")]

    make_project(root, 1, edit)
    from mlops.config import load
    from mlops.flows.session import Session

    art = root.parent / "artifact"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"placeholder: the stub answers for this release")
    Session.open(load(root / "mlops.yaml")).registry.publish(RELEASE, art, {"model": "tiny", "lineage": {}})
    return root


def env(repo: Path = REPO) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(repo)}


def eval_argv(url: str) -> list[str]:
    return [sys.executable, "-m", "mlops.cli.main", "eval", "--release", RELEASE, "--url", url, "--json"]


def timed(argv: list[str], cwd: Path, repo: Path = REPO) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one process. On a shared machine the CPU time
    moves less with the load than the wall time does, so both are printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env(repo), capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode not in (0, 3):
        raise RuntimeError(f"{argv[:4]} exited {r.returncode}: {r.stderr[-2000:]}")
    return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def profile(root: Path, url: str, out: Path) -> None:
    """Where one `mlops eval` process spends its time: slowest imports, then cProfile's top functions."""
    shutil.rmtree(root / ".mlops" / "cache", ignore_errors=True)
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *eval_argv(url)[1:]], cwd=root, env=env(), capture_output=True, text=True
    )
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = (x.strip() for x in line.removeprefix("import time:").split("|"))
            if cum.isdigit():
                rows.append((int(cum), name))
    top = [(us, name) for us, name in sorted(rows, reverse=True) if not name.startswith(" " * 4)][:25]
    print("\nslowest imports of one `mlops eval` process (cumulative ms, -X importtime):")
    for us, name in top:
        print(f"  {us / 1000:8.1f}  {name}")
    shutil.rmtree(root / ".mlops" / "cache", ignore_errors=True)
    stats = out / "eval.prof"
    subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), *eval_argv(url)[1:]],
        cwd=root,
        env=env(),
        check=False,
        stdout=subprocess.DEVNULL,
    )
    print("\ncProfile of one `mlops eval` process (top 25 by cumulative time):")
    pstats.Stats(str(stats)).sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the stub waits before each answer")
    ap.add_argument("--profile", action="store_true", help="also print -X importtime and cProfile of one eval")
    ap.add_argument("--before", type=Path, help="another checkout whose `mlops eval` runs as a third arm")
    args = ap.parse_args()
    arms = ["raw", "eval"] + (["before"] if args.before else [])

    with tempfile.TemporaryDirectory(prefix="bench-eval-process-") as tmp, stub(args.latency) as url:
        root = project(Path(tmp) / "project", args.n, args.concurrency)
        cases = root / "evals" / "bench.jsonl"
        raw_argv = [sys.executable, "-c", RAW, url, str(cases), str(args.concurrency), RELEASE]
        timed(raw_argv, root)  # warm the OS file cache (and bytecode) for every arm
        wall: dict[str, list[float]] = {a: [] for a in arms}
        cpu: dict[str, list[float]] = {a: [] for a in arms}
        for rep in range(args.reps + 1):
            order = arms[rep % len(arms) :] + arms[: rep % len(arms)]  # rotate who goes first
            for arm in order:
                shutil.rmtree(root / ".mlops" / "cache", ignore_errors=True)  # an empty eval cache
                argv = raw_argv if arm == "raw" else eval_argv(url)
                w, c = timed(argv, root, args.before if arm == "before" else REPO)
                if rep > 0:  # round 0 warms up
                    wall[arm].append(w)
                    cpu[arm].append(c)
        if args.profile:
            profile(root, url, Path(tmp))

    print(
        f"\n`mlops eval` process over raw httpx: {args.n} cases, concurrency {args.concurrency}, stub {args.latency * 1000:.0f} ms,"
    )
    print(f"{args.reps} interleaved rounds, load average {load_avg()}")
    print(f"{'':30}{'median':>10}{'min':>10}{'max':>10}")

    def row(name: str, xs: list[float]) -> None:
        print(f"{name:30}{statistics.median(xs):>10.3f}{min(xs):>10.3f}{max(xs):>10.3f}")

    def per_round(a: str, b: str, d: dict[str, list[float]]) -> list[float]:
        return [x / y for x, y in zip(d[a], d[b], strict=True)]

    names = {"raw": "raw httpx process", "eval": "mlops eval process", "before": "mlops eval, --before checkout"}
    for arm in arms:
        row(f"{names[arm]} (s)", wall[arm])
    for arm in arms:
        row(f"{names[arm]} CPU (s)", cpu[arm])
    row("eval / raw", per_round("eval", "raw", wall))
    row("eval / raw, CPU", per_round("eval", "raw", cpu))
    if args.before:
        row("before / raw", per_round("before", "raw", wall))
        row("eval / before", per_round("eval", "before", wall))
    med = statistics.median(per_round("eval", "raw", wall))
    print(f"\neval / raw (median of rounds) {med:.2f}  goal <= 1.5  {'OK' if med <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
