"""The step-by-step commands the workflows call: train, eval, deploy (with a canary), rollback, report."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert j("eval", "--release", "candidate", "--set", "models.tiny.train.seed=1", cwd=root)["passed"] is True
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
    md = mlops("report", "--release", str(b["release"]), "--markdown", cwd=root)
    assert md.returncode == 0 and md.stdout.startswith("<!-- mlops-eval-report -->")


def test_deploy_without_eval_results_is_a_usage_error(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    rid = j("train", cwd=root)["release"]
    r = mlops("deploy", "--release", str(rid), cwd=root)
    assert r.returncode == 1 and "has no eval results" in r.stderr and r.stderr.strip().count("\n") == 0
    r = mlops("eval", "--release", "nope", cwd=root)
    assert r.returncode == 1 and "unknown release 'nope'" in r.stderr
