"""Monitoring costs: what capture adds to serving, and `mlops monitor` over 100k captured requests.

    python benchmarks/bench_monitor.py [--steps 40] [--requests 400] [--reps 5] [--captured 100000]

Trains one release of the shipped example's architecture briefly in a temporary copy of the
example project, then:

(i)  capture overhead: two `mlops serve` processes on the same registry, one with capture off
     (`monitor.enabled=false`), one with the default capture (full text, every request); `--requests`
     completions at concurrency 16 against each, alternating which goes first, `--reps` times.
     Reported: p99 latency per side (the median over the reps) and on / off. Target <= 1.05.
(ii) `mlops monitor --json` (the real CLI, its own process) over `--captured` requests written as
     the capture writer writes them (1,000 per file, the example's kind of prompts, realistic
     outputs, a few errors, and its loss counters), embedding drift included. Reported: wall time and the command's peak
     RSS (getrusage of a fresh parent, as /usr/bin/time). Targets <= 10 s and <= 500 MB.

Bounded: fixed request counts, deadlines on every phase, servers stopped before the script exits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import example_release, load_avg, load_options, mlops_serve, prompts  # noqa: E402
from bench_serving import fixed_load  # noqa: E402

from mlops.monitor.capture import chunk_key  # noqa: E402
from mlops.monitor.tally import Tally  # noqa: E402
from mlops.registry.store import LocalStore  # noqa: E402


def overhead(root: Path, requests: int, reps: int, max_seconds: float) -> dict[str, list[float]]:
    bodies = prompts(requests)
    p99: dict[str, list[float]] = {"off": [], "on": []}
    with mlops_serve(root, "monitor.enabled=false") as off, mlops_serve(root) as on:
        urls = {"off": off, "on": on}
        for url in urls.values():
            asyncio.run(fixed_load(url, bodies[:64], 16, time.monotonic() + 60))  # warm up
        for rep in range(reps):
            for name in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                r = asyncio.run(fixed_load(urls[name], bodies, 16, time.monotonic() + max_seconds))
                assert r["failed"] == 0, r
                p99[name].append(r["p99"])
    return p99


def write_capture(root: Path, n: int, per_file: int = 1000) -> None:
    """`n` records as the capture writer writes them, over the last hour, with its loss counters."""
    rng = random.Random(0)
    base = root / ".mlops"
    tally = Tally("local", "bench")
    now = time.time() - 3600
    rel = json.loads((base / "state.json").read_text())["stages"]["production"]
    for start in range(0, n, per_file):
        lines = []
        for i in range(start, min(n, start + per_file)):
            x = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10)))
            out = x[::-1] if rng.random() < 0.9 else ""
            status = 200 if rng.random() > 0.002 else 503
            rec = {
                "v": 1, "id": f"cmpl-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}", "time": now + i * 0.03,
                "source": "local", "release": rel, "route": "completions", "status": status,
                "latency_s": rng.uniform(0.005, 0.05), "stream": False, "max_tokens": 16,
                "prompt_tokens": len(x) + 1, "completion_tokens": len(out) + 1, "finish_reason": "stop",
                "prompt_len": len(x) + 1, "output_len": len(out), "prompt": x + "=", "output": out,
            }  # fmt: skip
            lines.append(json.dumps(rec, separators=(",", ":")))
            tally.add(rec["time"], "answered")
            tally.add(rec["time"], "captured")
        first, last = json.loads(lines[0])["time"], json.loads(lines[-1])["time"]
        path = base / chunk_key(first, last, "local")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    tally.flush(LocalStore(base))


# A fresh interpreter runs the command and reports its child's peak RSS, as /usr/bin/time does:
# Linux carries a process's peak RSS across exec, so a child forked straight from this process
# (which trained a model with torch) would report this process's size, not its own.
PEAK = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(ru.ru_maxrss, ru.ru_utime + ru.ru_stime, file=sys.stderr)
sys.exit(rc)
"""


def monitor_run(root: Path) -> tuple[float, float, float, dict[str, object]]:
    """(wall s, CPU s, peak RSS MB, report) of `mlops monitor --json` in its own process. CPU
    seconds say what the command costs whatever else the machine runs; wall time does not."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, "-m", "mlops.cli.main", "monitor", "--json"],
        cwd=root, capture_output=True, text=True, timeout=300, env=os.environ | {"MLOPS_WANDB": "disabled"},
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"mlops monitor failed ({r.returncode}): {r.stderr}")
    maxrss, cpu = r.stderr.strip().splitlines()[-1].split()
    return wall, float(cpu), int(maxrss) / 1024, json.loads(r.stdout)  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = load_options(
        __doc__, requests=(400, "requests per run, concurrency 16"), reps=(5, "alternating repetitions of on and off")
    )
    ap.add_argument("--captured", type=int, default=100_000, help="captured requests for mlops monitor")
    ap.add_argument("--skip-serving", action="store_true", help="only (ii)")
    args = ap.parse_args()
    with example_release("bench-monitor-", args.steps) as (root, _, rid, _):
        print(f"trained {rid}; load average {load_avg()} on {os.cpu_count()} cores")
        gc.collect()
        gc.freeze()
        if not args.skip_serving:
            p99 = overhead(root, args.requests, args.reps, args.max_seconds)
            off, on = statistics.median(p99["off"]), statistics.median(p99["on"])
            print(f"(i) p99 at c=16, capture off: {off * 1000:.1f} ms  {[round(v * 1000, 1) for v in p99['off']]}")
            print(f"    p99 at c=16, capture on:  {on * 1000:.1f} ms  {[round(v * 1000, 1) for v in p99['on']]}")
            print(f"    ratio on / off (medians of {args.reps}): {on / off:.3f}   target <= 1.05")
            shutil.rmtree(root / ".mlops" / "monitor", ignore_errors=True)  # (ii) reads only its own
        write_capture(root, args.captured)
        wall, cpu, peak, rep = monitor_run(root)
        print(
            f"(ii) mlops monitor over {rep['requests']:,} requests ({rep['files']} files): wall {wall:.1f} s "
            f"(CPU {cpu:.1f} s), peak RSS {peak:.0f} MB   targets <= 10 s, <= 500 MB; verdict {rep['verdict']}"
        )
        capture = rep.get("capture") or {}
        print(f"     capture counters: answered {capture.get('answered')}, captured {capture.get('captured')}")
        print(f"load average at the end: {load_avg()}")


if __name__ == "__main__":
    main()
