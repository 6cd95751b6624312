"""What the benchmarks share: the example project in a temporary folder, a trained release in
production, `mlops serve` in its own process, the prompts they send and the figures they print.

Imported by the scripts in this folder (`python benchmarks/bench_X.py` puts it on sys.path); it
puts the checkout first on sys.path, so a benchmark measures this tree's code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mlops.env import set_offline  # noqa: E402

set_offline()

import yaml  # noqa: E402

from mlops.testing import mlops_serve as _serve  # noqa: E402
from mlops.util import free_port  # noqa: E402

__all__ = [
    "REPO",
    "example_release",
    "free_port",
    "load_avg",
    "load_options",
    "make_project",
    "mlops_serve",
    "pct",
    "prompts",
    "train_release",
]


def load_options(doc: str | None, requests: tuple[int, str], reps: tuple[int, str]) -> argparse.ArgumentParser:
    """The options of a benchmark that puts load on `mlops serve`: training steps, requests per
    measured run and interleaved repetitions (each a default and its help), a deadline per phase;
    the script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each release (brief)")
    ap.add_argument("--requests", type=int, default=requests[0], help=requests[1])
    ap.add_argument("--reps", type=int, default=reps[0], help=reps[1])
    ap.add_argument("--max-seconds", type=float, default=240, help="deadline of each measured phase")
    return ap


def pct(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; NaN (not 0) for no values, so a table shows it."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_project(root: Path, steps: int, edit: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """The shipped example in `root`, W&B off, `steps` training steps; `edit` may change the config."""
    shutil.copytree(REPO / "data", root / "data")
    shutil.copytree(REPO / "evals", root / "evals")
    cfg = yaml.safe_load((REPO / "mlops.yaml").read_text())
    cfg["tracking"] = {"wandb": {"mode": "disabled"}}
    cfg["models"]["tiny"]["train"].update({"steps": steps, "warmup_steps": min(10, steps)})
    if edit is not None:
        edit(cfg, root)
    (root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def train_release(root: Path, overrides: list[str] | None = None) -> tuple[Any, str, float]:
    """Train the project's `tiny` model and promote it: (the session, the release, seconds taken)."""
    from mlops.config import load
    from mlops.pipeline import Session, train
    from mlops.rollout import promote

    s = Session.open(load(root / "mlops.yaml", overrides or []))
    t0 = time.perf_counter()
    rid = str(train(s, "tiny").release)
    promote(s.backend, rid, reason="benchmark")
    return s, rid, time.perf_counter() - t0


@contextlib.contextmanager
def example_release(
    prefix: str, steps: int, edit: Callable[[dict[str, Any], Path], None] | None = None
) -> Iterator[tuple[Path, Any, str, float]]:
    """The example project in a temporary folder with one release trained and in production:
    (its root, the session, the release, seconds of training). The folder is removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        root = make_project(tmp / "proj", steps, edit)
        yield (root, *train_release(root))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def mlops_serve(root: Path, *sets: str) -> Iterator[str]:
    """`mlops serve --set S...` (the real CLI, its own process); its URL once a model is loaded."""
    with _serve(root, *(a for s in sets for a in ("--set", s)), loaded=True) as url:
        yield url


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` example inputs of 6-10 lowercase letters, as the model's prompt (`x=`)."""
    rng = random.Random(seed)
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(6, 10))) + "=" for _ in range(n)
    ]


def load_avg() -> str:
    """The 1, 5 and 15-minute load averages, for the printed figures (the machine is shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
