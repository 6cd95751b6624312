"""The step-by-step commands the workflows call: train, eval, deploy (with a canary), rollback, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import make_project, mlops


def j(*args: str, cwd: Path, code: int = 0) -> dict[str, object]:
    r = mlops(*args, "--json", cwd=cwd)
    assert r.returncode == code, (args, r.stderr)
    return dict(json.loads(r.stdout))


def test_train_eval_deploy_canary_rollback(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", {"deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 10}}})
    assert j("plan", cwd=root)["models"][0]["train"] is True  # type: ignore[index]
    a = j("train", cwd=root)
    assert a["trained"] is True
    assert j("train", cwd=root)["trained"] is False  # unchanged: no retraining
    ev = j("eval", "--release", "candidate", cwd=root)
    assert ev["release"] == a["release"] and ev["passed"] is True
    dep = j("deploy", "--release", str(a["release"]), cwd=root)
    assert dep["status"] == "promoted" and dep["canary"] == []  # first release: nothing to compare with

    b = j("train", "--set", "models.tiny.train.seed=1", cwd=root)
    assert b["trained"] is True and b["release"] != a["release"]
    ev_b = j("eval", "--release", "candidate", "--set", "models.tiny.train.seed=1", cwd=root)
    assert ev_b["passed"] is True
    dep = j("deploy", "--release", str(b["release"]), cwd=root)
    assert dep["status"] == "promoted" and dep["previous"] == a["release"]
    assert [s["percent"] for s in dep["canary"]] == [50, 100]  # type: ignore[union-attr]
    rel = j("releases", cwd=root)
    assert (rel["production"], rel["previous"]) == (b["release"], a["release"])

    back = j("rollback", cwd=root)
    assert back["production"] == a["release"] and back["rolled_back_from"] == b["release"]
    events = [e["event"] for e in j("history", str(b["release"]), cwd=root)["history"]]  # type: ignore[union-attr]
    assert (
        events[:3] == ["registered", "evaluated", "gates_passed"] and "canary_step" in events and "promoted" in events
    )

    rep = j("report", "--release", str(b["release"]), cwd=root)
    assert rep["release"] == b["release"]
    assert_report_shape(rep, ev_b, production=str(a["release"]))
    md = mlops("report", "--release", str(b["release"]), "--markdown", cwd=root)
    assert md.returncode == 0 and md.stdout.startswith("<!-- mlops-eval-report -->")


def test_deploy_without_eval_results_is_a_usage_error(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    rid = j("train", cwd=root)["release"]
    r = mlops("deploy", "--release", str(rid), cwd=root)
    assert r.returncode == 1 and "has no eval results" in r.stderr and r.stderr.strip().count("\n") == 0
    r = mlops("eval", "--release", "nope", cwd=root)
    assert r.returncode == 1 and "unknown release 'nope'" in r.stderr


# The workflows read `mlops report --json`: its keys, in this order, are a contract (report/model.py).
REPORT_KEYS = "release model baseline baseline_stage production status verdict gates metrics worst_cases trend"
ROW_KEYS = "suite metric stat stat_threshold higher_is_better production candidate delta interval paired_cases"
CASE_KEYS = "suite metric id loss input expected candidate candidate_score candidate_error production production_score"
COST_KEYS = (
    "train_seconds train_device gpu_seconds train_tokens train_precision gpu_type peak_memory_mb train_cost_usd"
    " endpoint_calls cache_hits retries errors completion_tokens eval_seconds judge_calls judge_cache_hits"
    " judge_failures judge_tokens"
)
GATE_KEYS = (
    "name eval metric stat kind candidate production delta interval threshold passed reason n higher_is_better"
    " stat_threshold segment"
)


def assert_report_shape(rep: dict[str, Any], ev: dict[str, Any], production: str) -> None:
    """The report of a release evaluated against `production`: its shape, and numbers that match `mlops eval`."""
    assert list(rep) == [*REPORT_KEYS.split(), "cost", "suites", "lineage", "segments", "noise", "new_cases", "budget"]
    assert rep["baseline"] == production and rep["baseline_stage"] == "production" and rep["production"] == production
    assert rep["verdict"] == "pass" and rep["model"] == "tiny"
    assert [list(g) for g in rep["gates"]] == [GATE_KEYS.split()] * len(ev["gates"])
    assert [g["name"] for g in rep["gates"]] == [g["name"] for g in ev["gates"]]
    assert rep["metrics"] and all(
        list(r) == [*ROW_KEYS.split(), "threshold", "verdict", "failed_cases", "n"] for r in rep["metrics"]
    )
    for r in rep["metrics"]:
        if r["stat"] == "mean":  # the candidate's mean is what `mlops eval` reported
            assert r["candidate"] == ev["metrics"][r["suite"]][r["metric"]]["mean"], r
            assert isinstance(r["higher_is_better"], bool) and r["n"] == ev["metrics"][r["suite"]][r["metric"]]["n"]
    assert list(rep["worst_cases"]) == ["compared", "cases"] and rep["worst_cases"]["compared"] is True
    assert all(list(c) == CASE_KEYS.split() for c in rep["worst_cases"]["cases"])
    assert all(
        list(t) == ["suite", "metric", "stat", "stat_threshold", "label", "points", "bounds"] for t in rep["trend"]
    )
    assert all(list(p) == ["release", "value", "production", "this"] for t in rep["trend"] for p in t["points"])
    assert list(rep["cost"]) == COST_KEYS.split()
    assert rep["cost"]["endpoint_calls"] == sum(c["endpoint_calls"] for c in ev["cost"].values()) > 0
    assert rep["cost"]["train_device"] and rep["cost"]["train_seconds"] > 0
    assert list(rep["suites"]) == list(ev["metrics"]) and list(rep["suites"]["heldout"]) == ["n", "created_at"]
    assert rep["lineage"]["fingerprint"]
