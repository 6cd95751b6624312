"""Data checks per dataset: `mlops validate --data`, training refusing bad data (naming the rows),
and dataset drift against the previous release recorded in the lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import mlops, train_and_publish

from mlops.config import load
from mlops.pipeline import Session


def append_rows(path: Path, rows: list[object]) -> int:
    """Append rows (JSON, or raw text for str); return the line number of the first one."""
    first = len(path.read_text().splitlines()) + 1
    with path.open("a") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return first


def test_the_shipped_data_passes(project: Path) -> None:
    r = mlops("validate", "--data", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] and res["datasets"]["train"]["rows"] == 20000


def test_bad_rows_are_named_by_line(project: Path) -> None:
    heldout = json.loads((project / "evals" / "heldout.jsonl").read_text().splitlines()[3])["input"]
    line = append_rows(
        project / "data" / "train.jsonl",
        [
            {"input": heldout, "expected": "x"},  # leakage
            {"input": "", "expected": "x"},  # empty input
            {"input": "abc"},  # missing target
            {"input": 7, "expected": "x"},  # wrong type
            "{not json",
        ],
    )
    r = mlops("validate", "--data", "--json", cwd=project)
    assert r.returncode == 1
    found = {f["check"]: f for f in json.loads(r.stdout)["datasets"]["train"]["findings"]}
    assert found["leakage"]["rows"] == [line] and "eval set 'heldout'" in found["leakage"]["message"]
    assert found["length"]["rows"] == [line + 1]
    assert found["required"]["rows"] == [line + 2]
    assert found["types"]["rows"] == [line + 3]
    assert found["json"]["rows"] == [line + 4]
    assert "error: data checks failed" in r.stderr
    # training refuses before it starts, naming the rows (exit 1, no release registered)
    t = mlops("train", cwd=project)
    assert t.returncode == 1
    assert f"error: training refused: data/train.jsonl: json: 1 line(s) are not JSON (lines {line + 4})" in t.stderr
    assert "and 4 more failed check(s)" in t.stderr
    assert not (project / ".mlops" / "releases").exists()


def test_severity_and_ranges_come_from_the_config(project: Path) -> None:
    cfg = yaml.safe_load((project / "mlops.yaml").read_text())
    cfg["datasets"]["train"]["checks"] = {"max_length": 9, "duplicates": "error"}
    (project / "mlops.yaml").write_text(yaml.safe_dump(cfg))
    line = append_rows(project / "data" / "train.jsonl", [{"input": "kjxt", "expected": "txjk"}])
    r = mlops("validate", "--data", "--json", cwd=project)
    assert r.returncode == 1
    found = {f["check"]: f for f in json.loads(r.stdout)["datasets"]["train"]["findings"]}
    assert found["duplicates"]["severity"] == "error" and found["duplicates"]["rows"] == [line]
    assert "longer than 9" in found["length"]["message"]
    cfg["datasets"]["train"]["checks"] = {"duplicates": "warn"}
    (project / "mlops.yaml").write_text(yaml.safe_dump(cfg))
    r = mlops("validate", "--data", "--json", cwd=project)
    assert r.returncode == 0, r.stderr  # a warning is reported, not fatal


def test_a_misspelt_check_key_names_line_and_suggestion(project: Path) -> None:
    text = (
        (project / "mlops.yaml")
        .read_text()
        .replace(
            "  train:\n    path: data/train.jsonl\n",
            "  train:\n    path: data/train.jsonl\n    checks: {leakge: warn}\n",
        )
    )
    (project / "mlops.yaml").write_text(text)
    r = mlops("validate", cwd=project)
    assert r.returncode == 1
    line = text.splitlines().index("    checks: {leakge: warn}") + 1
    assert f"mlops.yaml:{line}: datasets.train.checks.leakge: unknown key 'leakge'" in r.stderr
    assert "did you mean 'leakage'" in r.stderr


def test_dataset_drift_against_the_previous_release_goes_into_the_lineage(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train_and_publish(project, steps=2)
    append_rows(project / "data" / "train.jsonl", [{"input": "q" * 12, "expected": "q" * 12}] * 3000)
    report = {  # what `mlops monitor --json --out` writes, trimmed to what the lineage keeps
        "release": first, "since": "a", "until": "b", "requests": 500,
        "checks": [{"name": "char_js", "value": 0.9, "threshold": 0.2, "drifted": True},
                   {"name": "error_rate", "value": 0.0, "threshold": 0.05, "drifted": False}],
    }  # fmt: skip
    (project / "drift.json").write_text(json.dumps(report))
    monkeypatch.setenv("MLOPS_DRIFT_REPORT", str(project / "drift.json"))
    second = train_and_publish(project, steps=2)
    reg = Session.open(load(project / "mlops.yaml")).registry
    lin1 = reg.manifest(first)["lineage"]
    lin2 = reg.manifest(second)["lineage"]
    assert lin1["dataset_drift"] is None and lin1["data_profile"]["rows"] == 20000
    drift = lin2["dataset_drift"]
    assert drift["against"] == first and drift["rows"] == [20000, 23000]
    assert drift["input_length_psi"] > 0.2 and drift["char_js"] > 0.05
    assert lin1["drift_trigger"] is None
    assert lin2["drift_trigger"] == {
        "release": first, "window": ["a", "b"], "requests": 500,
        "drifted": [{"name": "char_js", "value": 0.9, "threshold": 0.2}],
    }  # fmt: skip


def test_drift_trigger_of_several_models_is_the_drifted_models_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-model request (the nightly's cut): `a`'s lineage gets `a`'s release, requests and
    checks (named as in a one-model report); `b`, trained in the same run for another reason, none."""
    from test_retrain_request import two_models_report

    from mlops.monitor.datachecks import drift_trigger

    (tmp_path / "drift.json").write_text(json.dumps(two_models_report("a", "a-7", "char_js")))
    monkeypatch.setenv("MLOPS_DRIFT_REPORT", str(tmp_path / "drift.json"))
    assert drift_trigger("a") == {
        "release": "a-7", "window": [1.0, 2.0], "requests": 50,
        "drifted": [{"name": "char_js", "value": 0.9, "threshold": 0.2}],
    }  # fmt: skip
    assert drift_trigger("b") is None
