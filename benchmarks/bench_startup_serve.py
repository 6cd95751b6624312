"""`mlops serve` start-up with the builtin engine, this checkout against a baseline commit.

    python benchmarks/bench_startup_serve.py [--baseline REV] [--runs 5] [--requests 200] [--steps 40]

Trains one release of the shipped example (n_layer 3, n_embd 128) briefly in a temporary copy of
the example project; exports the `mlops` package of `--baseline` (default: the commit before the
start-up work of issue 18) with `git archive`; then, in one run on the same machine:

  start-up   `mlops serve` (the real CLI, its own process) from launch to the first completion
             answered (200), `--runs` times per tree, the two trees interleaved; medians
  req/s      `--requests` completions (up to 8 tokens, greedy) one at a time (c=1) and at
             concurrency 16, against one server of each tree (as bench_engines.py)

Prints the figures and the ratios this checkout / baseline (goal: start-up <= 2 s on a quiet
machine, req/s ratios >= 0.95). Every server is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, example_release, free_port, load_avg, prompts  # noqa: E402
from bench_engines import launched, rate  # noqa: E402

BASELINE = "b01dc19"  # main before the builtin engine's start-up work (issue 18, item 4)


def export(rev: str, dest: Path) -> Path:
    """The `mlops` package as of `rev`, under `dest` (a directory to put first on PYTHONPATH)."""
    archive = dest / "mlops.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "mlops"], stdout=out, check=True, timeout=60)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def baseline_project(tree: Path, root: Path, dest: Path) -> Path:
    """A copy of the project (its registry included) whose mlops.yaml keeps only the top-level keys
    the baseline's config knows: keys added since (e.g. `budget`) do not touch serving, and the
    baseline refuses unknown keys."""
    import shutil

    import yaml

    known = subprocess.run(
        [sys.executable, "-c", "from mlops.config import Config; print(' '.join(Config.model_fields))"],
        env=os.environ | {"PYTHONPATH": str(tree)},
        cwd=tree,  # `python -c` puts its cwd first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    shutil.copytree(root, dest, symlinks=True)
    doc = yaml.safe_load((dest / "mlops.yaml").read_text())
    dropped = sorted(set(doc) - set(known))
    (dest / "mlops.yaml").write_text(yaml.safe_dump({k: v for k, v in doc.items() if k in known}, sort_keys=False))
    if dropped:
        print(f"baseline: mlops.yaml without {', '.join(dropped)} (keys it does not know)", file=sys.stderr)
    return dest


def serve(tree: Path, root: Path, port: int, log: Path):  # type: ignore[no-untyped-def]
    env = os.environ | {"MLOPS_WANDB": "disabled", "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port)]
    return launched(argv, root, env, f"http://127.0.0.1:{port}", {}, "tiny", log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    ap.add_argument("--runs", type=int, default=5, help="start-ups per tree (interleaved)")
    ap.add_argument("--requests", type=int, default=200, help="completions per concurrency level")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the release served")
    args = ap.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp,
        example_release("bench-startup-", args.steps) as (
            root,
            _s,
            _rid,
            _,
        ),
    ):
        trees = {"baseline": export(args.baseline, Path(tmp)), "this": REPO}
        roots = {"baseline": baseline_project(trees["baseline"], root, Path(tmp) / "baseline-proj"), "this": root}
        bodies = prompts(args.requests)
        print(f"load average at start: {load_avg()}", file=sys.stderr)
        startups: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(args.runs):
            for name, tree in trees.items():
                with serve(tree, roots[name], free_port(), Path(tmp) / f"{name}-{i}.log") as startup:
                    startups[name].append(startup)
                print(f"run {i}: {name} start-up {startup:.2f}s", file=sys.stderr, flush=True)
        rates: dict[str, tuple[float, float]] = {}
        for name, tree in trees.items():
            port = free_port()
            with serve(tree, roots[name], port, Path(tmp) / f"{name}-rate.log"):
                url = f"http://127.0.0.1:{port}"
                rates[name] = (
                    asyncio.run(rate(url, {}, "tiny", bodies, 1)),
                    asyncio.run(rate(url, {}, "tiny", bodies, 16)),
                )
            print(f"{name}: c=1 {rates[name][0]:.1f} req/s, c=16 {rates[name][1]:.1f} req/s", file=sys.stderr)
        print(f"load average at end: {load_avg()}", file=sys.stderr)

    med = {name: statistics.median(v) for name, v in startups.items()}
    print(f"\n| | baseline ({args.baseline}) | this checkout | ratio |\n|---|---|---|---|")
    print(f"| start-up to first answer, median of {args.runs} | {med['baseline']:.2f} s | {med['this']:.2f} s | "
          f"{med['this'] / med['baseline']:.2f} |")  # fmt: skip
    for i, c in enumerate((1, 16)):
        b, t = rates["baseline"][i], rates["this"][i]
        print(f"| req/s at c={c} | {b:.1f} | {t:.1f} | {t / b:.2f} |")


if __name__ == "__main__":
    main()
