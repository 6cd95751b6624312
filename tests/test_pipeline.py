"""The README's loop on the shipped example, through the real CLI: run, rerun, sabotage, serve, rollback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import make_project, mlops, mlops_serve


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object], float]]:
    """The shipped example (real config: 500 steps, W&B offline), run once for the module."""
    root = make_project(tmp_path_factory.mktemp("example"), fast=False)
    t0 = time.perf_counter()
    r = mlops("run", "--json", cwd=root, env={"MLOPS_WANDB": ""})
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    yield root, json.loads(r.stdout), wall


@pytest.fixture(scope="module")
def server(example: tuple[Path, dict[str, object], float]) -> Iterator[str]:
    """`mlops serve` in the foreground of a subprocess, as a user runs it in a second shell."""
    with mlops_serve(example[0]) as url:
        yield url


def served_by(url: str, n: int = 10) -> set[str]:
    seen = set()
    for i in range(n):
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "abc=", "max_tokens": 8, "user": f"u{i}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-mlops-release"])
    return seen


def test_first_run_promotes_and_tracks(example: tuple[Path, dict[str, object], float]) -> None:
    root, res, wall = example
    assert res["status"] == "promoted" and res["trained"] is True
    assert res["served_by"] == res["release"] == res["production"]
    assert res["evals"]["heldout"]["exact_match"]["mean"] >= 0.5  # type: ignore[index]
    assert list((root / "wandb").glob("offline-run-*/files")), "W&B offline run files are written"
    print(f"\nfirst run: {wall:.1f}s wall")


def test_unchanged_rerun_skips_training(example: tuple[Path, dict[str, object], float]) -> None:
    root, first, wall = example
    t0 = time.perf_counter()
    r = mlops("run", "--json", cwd=root)
    rerun = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "unchanged" and res["trained"] is False and res["release"] == first["release"]
    assert "nothing changed" in r.stderr
    rel = json.loads(mlops("releases", "--json", cwd=root).stdout)
    assert len(rel["releases"]) == 1
    print(f"\nunchanged rerun: {rerun:.2f}s wall, ratio {rerun / wall:.3f}")


def test_sabotaged_run_fails_gate_and_production_keeps_serving(
    example: tuple[Path, dict[str, object], float], server: str
) -> None:
    root, first, _ = example
    assert served_by(server) == {first["release"]}
    r = mlops("run", "--json", "--set", "models.tiny.train.steps=1", cwd=root)
    assert r.returncode == 3, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "rejected" and res["production"] == first["release"]
    failed = [g for g in res["gates"] if not g["passed"]]
    assert failed and all(g["metric"] == "exact_match" for g in failed)
    assert served_by(server) == {first["release"]}, "the old model keeps serving"
    rel = json.loads(mlops("releases", "--json", cwd=root).stdout)
    assert rel["production"] == first["release"] and rel["candidate"] is None
    rejected = next(m for m in rel["releases"] if m["id"] == res["release"])
    assert rejected["status"] == "rejected"


def test_rollback_with_nothing_to_roll_back_to_is_a_usage_error(example: tuple[Path, dict[str, object], float]) -> None:
    r = mlops("rollback", cwd=example[0])
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "nothing to roll back to" in r.stderr
