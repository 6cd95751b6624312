"""The rollout controller: how fast its guardrail rolls a bad release back, and what it costs serving.

    python benchmarks/bench_controller.py [--steps 20] [--interval 1] [--reps 3] [--requests 300]

Trains three releases of the shipped example briefly (A in production, B, C) in a temporary copy of
the example project and starts `mlops serve` (the real CLI, its own process, its controller child)
with B made to answer 5% errors on prompts starting "zq" (the server's fault hook, as tests do).

(i)  decision latency: B is rolled out (`--no-wait`'s hand-off; replayed eval prompts, no "zq": it
     is promoted) with `bake_after_promote`; once it bakes, a client sends "zq" prompts. Measured:
     from the first failed request the client sees to the controller's rollback (the record's
     `finished_at`). Goal: one analysis interval (`deploy.rollout.interval`) + <= 1 s. The
     captured window reaches the store within `monitor.flush_interval` (0.2 s here), counted in.
(ii) overhead on serving p99: 8 clients send `--requests` completions while a guardrail bake of a
     healthy release runs (the controller reads the captured window every interval), and again
     once it has finished (the controller only reads the state), interleaved `--reps` times.
     Goal: p99 with the controller judging over p99 without <= 1.05: pooled over the repetitions,
     and the median of each repetition's ratio (on a shared machine a burst of someone else's load
     lands in one phase and moves the pooled p99; it moves one pair's ratio, not the median).
(iii) the same in finer slices, where the controller is a child process (`mlops serve` today): in
     one more guardrail bake, `--slices` pairs of `--requests` completions with the child running
     (judging every interval) and stopped (SIGSTOP), alternating (ABBA). Goal <= 1.05.

Prints the figures and the load average (the machine is shared). Everything is bounded and the
server is stopped before the script exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_avg, load_options, make_project, mlops_serve, pct, prompts  # noqa: E402

PATTERN = "^zq"


def edit(interval: float) -> Any:
    def change(cfg: dict[str, Any], root: Path) -> None:
        cfg["deploy"]["rollout"] = {
            "steps": [100],
            "requests_per_step": 8,
            "interval": interval,
            "bake_after_promote": 600.0,
            "guardrails": {"max_error_rate": 0.02, "min_requests": 20, "max_p95_ratio": None},
        }
        cfg.setdefault("monitor", {})["flush_interval"] = 0.2
        cfg["gates"] = []

    return change


def session(root: Path, *sets: str) -> Any:
    from mlops.config import load
    from mlops.pipeline import Session

    return Session.open(load(root / "mlops.yaml", list(sets)))


def train(root: Path, seed: int, promote: bool) -> str:
    from mlops.pipeline import train as do_train
    from mlops.rollout import promote as do_promote

    s = session(root, f"models.tiny.train.seed={seed}")
    rid = str(do_train(s, "tiny").release)
    if promote:
        do_promote(s.backend, rid, reason="benchmark")
    return rid


def wait(cond: Any, what: str, bound: float = 120.0) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def roll_out(root: Path, release: str, *sets: str) -> dict[str, Any]:
    """Hand `release` to the controller and wait until it is promoted and baking; the record."""
    from mlops.flows.stages import hand_off

    s = session(root, *sets)
    hand_off(s, release, started_by="benchmark")

    def baking() -> bool:
        rec = s.registry.read_state()[0].rollout
        if rec.get("status", "running") != "running":
            raise SystemExit(f"rollout of {release} ended: {rec.get('reason')}")
        return rec.get("phase") == "bake_after_promote"

    wait(baking, f"{release} to bake")
    return dict(s.registry.read_state()[0].rollout)


def finished(root: Path, rid: str) -> dict[str, Any]:
    from mlops.registry import rollouts

    reg = session(root).registry
    key = rollouts.archive_key("tiny", rid)
    wait(lambda: reg.store.get(key) is not None, f"rollout {rid} to finish")
    blob = reg.store.get(key)
    assert blob is not None
    return dict(json.loads(blob.data))


def decision_latency(root: Path, url: str, bad: str) -> float:
    """Seconds from the first failed request a client sees to the guardrail's rollback."""
    import httpx

    rec = roll_out(root, bad)
    first_bad: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(trust_env=False, timeout=30) as c:
            i = 0
            while not stop.is_set():
                r = c.post(
                    f"{url}/v1/completions", json={"model": "tiny", "prompt": "zqab=", "max_tokens": 2, "user": f"u{i}"}
                )
                if r.status_code >= 500 and not first_bad:
                    first_bad.append(time.time())
                i += 1

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        done = finished(root, rec["id"])
    finally:
        stop.set()
        t.join(timeout=60)
    assert done["decided_by"] == "controller:guardrail", done
    return float(done["finished_at"]) - first_bad[0]


async def load(url: str, n: int, concurrency: int = 8) -> list[float]:
    import httpx

    ps = prompts(n, seed=7)
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(c: httpx.AsyncClient, i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            r = await c.post(
                f"{url}/v1/completions", json={"model": "tiny", "prompt": ps[i], "max_tokens": 8, "user": f"p{i}"}
            )
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(trust_env=False, timeout=60) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    return lat


def controller_child(url: str) -> int | None:
    """The pid of the server's controller child process (its command line names the server's URL)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlops.rollout_process" in argv and url.encode() in argv:
                return int(d.name)
    return None


def slices(
    root: Path, url: str, rel: str, child: int, n: int, requests: int
) -> tuple[list[float], list[float], list[float]]:
    """(iii): within one guardrail bake, `n` pairs of load slices, the controller child running
    (judging) or stopped (SIGSTOP: no controller at all), in ABBA order; (judging latencies,
    stopped latencies, each pair's p99 ratio). Finer than (ii): a burst of the box's other load
    falls into a slice or two, not a whole phase."""
    import signal

    from mlops.rollout import rollback

    rec = roll_out(root, rel, "deploy.rollout.bake_after_promote=600")
    on: list[float] = []
    off: list[float] = []
    ratios: list[float] = []
    try:
        for i in range(n):
            got: dict[bool, list[float]] = {}
            for judging in (True, False) if i % 2 == 0 else (False, True):
                os.kill(child, signal.SIGCONT if judging else signal.SIGSTOP)
                got[judging] = asyncio.run(load(url, requests))
            on += got[True]
            off += got[False]
            ratios.append(pct(got[True], 0.99) / pct(got[False], 0.99))
    finally:
        os.kill(child, signal.SIGCONT)
    rollback(session(root).backend, rel, "benchmark: end the bake", "benchmark")
    finished(root, rec["id"])
    return on, off, ratios


def main() -> None:
    ap = load_options(__doc__, (300, "completions per measured phase"), (3, "interleaved repetitions"))
    ap.add_argument("--interval", type=float, default=1.0, help="deploy.rollout.interval (s)")
    ap.add_argument("--slices", type=int, default=8, help="(iii): pairs of slices, controller child judging / stopped")
    ap.set_defaults(steps=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-controller-"))
    try:
        root = make_project(tmp / "proj", args.steps, edit(args.interval))
        a = train(root, 0, promote=True)
        b = train(root, 1, promote=False)
        c = train(root, 2, promote=False)
        os.environ |= {"MLOPS_FAULT_RELEASE": b, "MLOPS_FAULT_RATE": "0.05", "MLOPS_FAULT_PATTERN": PATTERN}
        with mlops_serve(root) as url:
            lat = [decision_latency(root, url, b) for _ in range(args.reps)]
            with_ctl: list[float] = []
            idle: list[float] = []
            pairs: list[float] = []  # each repetition's p99 ratio
            healthy = [c, a]
            for i in range(args.reps):
                rel = healthy[i % 2]  # alternate: the other one is production now
                rec = roll_out(root, rel, "deploy.rollout.bake_after_promote=600")
                judged = asyncio.run(load(url, args.requests))
                with_ctl += judged
                from mlops.rollout import rollback

                s = session(root)
                rollback(s.backend, rel, "benchmark: end the bake", "benchmark")  # ends the record
                finished(root, rec["id"])
                quiet = asyncio.run(load(url, args.requests))
                idle += quiet
                pairs.append(pct(judged, 0.99) / pct(quiet, 0.99))
            child = controller_child(url)
            sliced = slices(root, url, healthy[args.reps % 2], child, args.slices, args.requests) if child else None
        print(f"load average {load_avg()}; interval {args.interval:g} s, flush 0.2 s")
        print(
            "(i) decision latency, first bad request -> rollback: "
            + ", ".join(f"{x:.2f}" for x in lat)
            + f" s (max {max(lat):.2f} s; goal <= interval + 1 s = {args.interval + 1:.2f} s)"
        )
        p_with, p_idle = pct(with_ctl, 0.99), pct(idle, 0.99)
        print(
            f"(ii) serving p99 with the controller judging {p_with * 1000:.1f} ms ({len(with_ctl)} req), "
            f"idle {p_idle * 1000:.1f} ms ({len(idle)} req): ratio {p_with / p_idle:.3f} (goal <= 1.05)"
        )
        print(
            "    per repetition: "
            + ", ".join(f"{r:.2f}" for r in pairs)
            + f"; median {statistics.median(pairs):.3f} (a burst of the box's other load moves one pair, not the median)"
        )
        if sliced is None:
            print("(iii) no controller child process (a controller thread in the server): not measured")
        else:
            on, off, ratios = sliced
            print(
                f"(iii) serving p99 in one guardrail bake, the controller child judging {pct(on, 0.99) * 1000:.1f} ms "
                f"over stopped (SIGSTOP) {pct(off, 0.99) * 1000:.1f} ms, {args.slices} alternating pairs of "
                f"{args.requests} requests: ratio {pct(on, 0.99) / pct(off, 0.99):.3f}; per pair median "
                f"{statistics.median(ratios):.3f} (goal <= 1.05)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
