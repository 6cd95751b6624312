"""What a live-analysis verdict costs the process that judges it (the rollout controller runs in
`mlops serve`): reading a window of captured requests from the store, and judging it.

    python benchmarks/bench_live_analysis.py [--captured 100000] [--reps 3]

Writes `--captured` requests as the capture writer writes them (1,000 per file, over the last hour,
10% to the candidate, 1% errors, short outputs with text) to a directory store, then times:
(i) `read_window` (a fresh reader: every file listed and parsed), (ii) the same window again through
one `WindowReader` (what a controller's every interval costs: files already parsed are not read
again), (iii) `judge_step` with three live metrics (json_valid, regex, length). Median of `--reps`.
Bounded: fixed sizes, no servers, a temporary directory removed at exit.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg  # noqa: E402

from mlops.config import RolloutCfg  # noqa: E402
from mlops.evals.metrics import JsonValid, Length, Regex  # noqa: E402
from mlops.monitor.capture import chunk_key  # noqa: E402
from mlops.monitor.record import encode  # noqa: E402
from mlops.registry.store import LocalStore  # noqa: E402
from mlops.rollout_analysis import WindowReader, judge_step, read_window  # noqa: E402


def write(store: LocalStore, n: int, t0: float) -> None:
    rng = random.Random(0)
    batch = []
    for i in range(n):
        out = "".join(rng.choices("abcdefgh", k=rng.randint(3, 12)))
        batch.append(
            {
                "v": 1,
                "id": f"cmpl-{i}",
                "time": t0 + i * 3600 / n,
                "source": "local",
                "release": "cand" if i % 10 == 0 else "prod",
                "route": "completions",
                "status": 500 if rng.random() < 0.01 else 200,
                "latency_s": rng.lognormvariate(-2.3, 0.5),
                "prompt_tokens": 8,
                "completion_tokens": 6,
                "finish_reason": "stop",
                "prompt_len": 11,
                "output_len": len(out),
                "prompt": "abcdefghij=",
                "output": out,
            }
        )
        if len(batch) == 1000:
            store.put(chunk_key(batch[0]["time"], batch[-1]["time"], "local"), b"".join(map(encode, batch)))
            batch = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captured", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        store = LocalStore(tmp / "store")
        t0 = time.time() - 3600
        write(store, args.captured, t0)
        cfg = RolloutCfg()
        metrics = [JsonValid({}), Regex({"pattern": "^[a-z]+$"}), Length({})]
        judge_step(read_window(store, "cand", "prod", t0, t0 + 60), cfg, metrics)  # scipy's import, once
        fresh, again, judged = [], [], []
        for _ in range(args.reps):
            a = time.perf_counter()
            read_window(store, "cand", "prod", t0, time.time())
            fresh.append(time.perf_counter() - a)
            reader = WindowReader(store, "cand", "prod")
            reader.read(t0, time.time())
            a = time.perf_counter()
            w = reader.read(t0, time.time())
            again.append(time.perf_counter() - a)
            a = time.perf_counter()
            v = judge_step(w, cfg, metrics)
            judged.append(time.perf_counter() - a)
        print(f"{args.captured} captured requests ({w.candidate.requests} candidate), load {load_avg()}")
        print(f"read_window, every file parsed:   {statistics.median(fresh):.3f} s")
        print(f"WindowReader, files parsed before: {statistics.median(again):.3f} s")
        print(f"judge_step, 3 live metrics:        {statistics.median(judged):.3f} s  ({v.decision})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
