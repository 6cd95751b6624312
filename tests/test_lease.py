"""Issue 9 item 4: one writer of the routing at a time (the rollout lease), with real processes.

A `mlops run` mid-canary is pre-empted by `mlops rollback` (the operator wins, the pipeline stops
without promoting, exit 3); a second `mlops run` fails naming the holder (exit 4) or waits for it,
and never tears down the live canary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import make_project, mlops, train_and_publish

from mlops.registry.releases import Registry
from mlops.registry.store import LocalStore

LEASE = {
    # The 50% step bakes long enough for another process to act while the canary is live, even on
    # a loaded machine: at load 18 a `mlops rollback` took over 90 s to arrive. A pre-empted
    # pipeline wakes within a heartbeat (TTL/3), so a long bake costs nothing when the test passes.
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 8, "bake": "300s", "lease_ttl": "6s"}},
    "evals": {"heldout": {"limit": 8}},
    "models": {"tiny": {"max_tokens": 4, "train": {"steps": 4}}},
}


def state(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / ".mlops" / "state.json").read_text()))


def history(root: Path, rid: str) -> list[str]:
    return [e["event"] for e in Registry(LocalStore(root / ".mlops")).history(rid)]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def background_run(root: Path, *sets: str) -> Iterator[subprocess.Popen[str]]:
    """`mlops run` in its own process (output to a file); always stopped by the test."""
    args = [a for s in sets for a in ("--set", s)]
    log = (root / f"run-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops.cli.main", "run", *args],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"MLOPS_WANDB": "disabled"},
    )
    proc.log = Path(log.name)  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, Path(proc.log).read_text()  # type: ignore[attr-defined]


def canary_live(root: Path) -> bool:
    try:
        return state(root)["stages"].get("canary") is not None
    except (FileNotFoundError, json.JSONDecodeError):
        return False


@pytest.fixture
def proj(tmp_path: Path) -> tuple[Path, str]:
    root = make_project(tmp_path / "lease", LEASE)
    return root, train_and_publish(root, seed=0)


def test_rollback_preempts_a_live_canary_and_the_pipeline_stops_without_promoting(proj: tuple[Path, str]) -> None:
    root, prod = proj
    with background_run(root, "models.tiny.train.seed=1") as run:
        wait_for(lambda: canary_live(root) or run.poll() is not None, "the canary to start")
        assert run.poll() is None, finish(run)[1][-3000:]
        cand = state(root)["stages"]["canary"]
        r = mlops("rollback", "--to", prod, "--reason", "operator drill", cwd=root, timeout=300)
        assert r.returncode == 0, r.stderr
        rc, out = finish(run)
    assert rc == 3, out[-3000:]
    assert "lost the rollout lease" in out and "operator drill" in out and "without promoting" in out, out[-2000:]
    st = state(root)
    assert st["stages"]["production"] == prod and st["stages"]["canary"] is None, st
    assert st["routing"] == {prod: 100}, st
    events = history(root, cand)
    assert "preempted" in events and "promoted" not in events, events


def test_a_second_run_fails_naming_the_holder_or_waits_and_never_tears_down_the_canary(
    proj: tuple[Path, str],
) -> None:
    root, prod = proj
    with background_run(root, "models.tiny.train.seed=2", "deploy.rollout.bake=45s") as first:
        wait_for(lambda: canary_live(root) or first.poll() is not None, "the canary to start")
        assert first.poll() is None, finish(first)[1][-3000:]
        cand = state(root)["stages"]["canary"]
        holder = state(root)["lease"]["owner"]
        impatient = mlops("run", "--set", "models.tiny.train.seed=3", "--set", "deploy.rollout.lease_wait=1s", cwd=root)
        assert impatient.returncode == 4, impatient.stderr[-3000:]
        assert "another rollout holds the lease" in impatient.stderr and holder in impatient.stderr, impatient.stderr
        st = state(root)
        assert st["stages"]["canary"] == cand and st["routing"].get(cand), f"the live canary was torn down: {st}"
        with background_run(root, "models.tiny.train.seed=4", "deploy.rollout.bake=0") as patient:
            rc, out = finish(first)
            assert rc == 0 and "promoted" in out, out[-3000:]
            rc2, out2 = finish(patient)
    assert rc2 == 0 and "waiting up to" in out2, out2[-3000:]
    st = state(root)
    assert st["stages"]["previous"] == cand and st["stages"]["production"] not in (cand, prod), st
    assert st["routing"] == {st["stages"]["production"]: 100} and not st["lease"], st
