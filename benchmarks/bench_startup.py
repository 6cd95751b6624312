"""`mlops validate` start-up against the floor of `python -c "import pydantic, yaml"`.

Both commands run alternately (so load on a shared machine hits both alike), each N times in
fresh processes; the ratio of the medians is printed. The goal (issue 11): within 2x.

Both run with compiled bytecode cached, as installed: pydantic's and yaml's .pyc files come with
their wheels, so with $PYTHONDONTWRITEBYTECODE set (as in this repository's dev environment)
only mlops would be compiled from source on every run, a cost no installed `mlops` pays. The
.pyc files go to a temporary PYTHONPYCACHEPREFIX, not into the tree.

    python benchmarks/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="bench-startup-pyc-") as pyc:
        os.environ["PYTHONPYCACHEPREFIX"] = pyc
        measure(args.runs)


def measure(runs: int) -> None:
    """Time the three commands alternately, `runs` times each, and print medians and ratios."""
    floor_cmd = [sys.executable, "-c", "import pydantic, yaml"]
    validate_cmd = [sys.executable, "-m", "mlops.cli.main", "validate"]
    help_cmd = [sys.executable, "-m", "mlops.cli.main", "--help"]
    for cmd in (floor_cmd, validate_cmd, help_cmd):  # warm the file cache and .pyc files
        _time(cmd)
    floor, validate, help_ = [], [], []
    for _ in range(runs):
        floor.append(_time(floor_cmd))
        validate.append(_time(validate_cmd))
        help_.append(_time(help_cmd))
    f, v, h = (statistics.median(x) for x in (floor, validate, help_))
    print(f"import pydantic, yaml  median {f:.3f}s over {runs} runs")
    print(f"mlops validate         median {v:.3f}s   ratio {v / f:.2f}x (goal: <= 2x)")
    print(f"mlops --help           median {h:.3f}s   ratio {h / f:.2f}x")


if __name__ == "__main__":
    main()
