"""The drift retrain request in the registry (mlops.monitor.retrain): put, take, done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlops.monitor import retrain
from mlops.registry.store import open_store


def test_request_is_kept_until_the_run_that_took_it_is_done(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "reg"))
    assert retrain.take(store, tmp_path / "none.json") is None and not (tmp_path / "none.json").exists()
    retrain.put(store, b'{"drifted": ["prompt_length_psi"]}')
    etag = retrain.take(store, tmp_path / "drift.json")
    assert etag and json.loads((tmp_path / "drift.json").read_text())["drifted"] == ["prompt_length_psi"]
    # a newer nightly replaced the request while the run trained: the run's `done` keeps it
    retrain.put(store, b'{"drifted": ["output_length_psi"]}')
    assert retrain.done(store, etag) is False and store.get(retrain.KEY) is not None
    newer = retrain.take(store, tmp_path / "drift.json")
    assert newer and retrain.done(store, newer) is True and store.get(retrain.KEY) is None


def test_command_line_as_the_workflows_call_it(tmp_path: Path) -> None:
    reg, report = tmp_path / "reg", tmp_path / "drift.json"
    report.write_text('{"drifted": ["x"]}')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mlops.monitor.retrain", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = run("take", "--storage", str(reg), str(tmp_path / "t.json"))
    assert out.returncode == 0 and out.stdout.strip() == ""  # nothing pending: the shell sees ""
    assert run("put", "--storage", str(reg), str(report)).returncode == 0
    etag = run("take", "--storage", str(reg), str(tmp_path / "t.json")).stdout.strip()
    assert etag and (tmp_path / "t.json").read_text() == report.read_text()
    assert run("done", "--storage", str(reg), etag).stdout.strip() == "removed"
    (tmp_path / "bad.json").write_text("not json")
    bad = run("put", "--storage", str(reg), str(tmp_path / "bad.json"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: the drift report is not JSON")


def two_models_report(model: str, release: str, check: str) -> dict[str, object]:
    """What the nightly writes for two deployed models (`retrain.cut` of `mlops monitor --json`),
    `model` drifted, the other not."""
    other = "b" if model == "a" else "a"
    full = {
        "release": None, "since": 1.0, "until": 2.0, "requests": 90, "verdict": "drift",
        "drifted": [f"{model}.{check}"],
        "checks": [{"name": f"{model}.{check}", "value": 0.9, "threshold": 0.2, "drifted": True, "group": "input"},
                   {"name": f"{other}.{check}", "value": 0.01, "threshold": 0.2, "drifted": False, "group": "input"}],
        "models": {model: {"release": release, "requests": 50, "drifted": [check], "checks": []},
                   other: {"release": f"{other}-1", "requests": 40, "drifted": [], "checks": []}},
    }  # fmt: skip
    return retrain.cut(full)


def test_a_request_names_the_drifted_model_and_a_newer_one_for_another_keeps_it(tmp_path: Path) -> None:
    """Several deployed models: the request names the models that drifted; `flags` turns it into
    `mlops run --force-model` for those; a newer night's drift of the other model is merged in,
    not put over it (its CT run may have failed), whether it comes by the registry or the dispatch."""
    a = two_models_report("a", "a-1", "prompt_length_psi")
    assert a["models"]["a"] == {"release": "a-1", "requests": 50, "drifted": ["prompt_length_psi"]}
    assert retrain.drifted_models(a) == ["a"] and "checks" not in a["models"]["a"]
    assert retrain.flags(a, ["a", "b"]) == (["--force-model", "a"], [])
    assert retrain.flags(a, ["b"]) == ([], ["a"])  # `a` no longer deployed: nothing forced, said
    one = {"release": "tiny-1", "drifted": ["char_js"], "checks": []}  # one deployed model: no `models`
    assert retrain.drifted_models(one) is None and retrain.flags(one, ["tiny"]) == (["--force"], [])

    store = open_store(str(tmp_path / "reg"))
    retrain.put(store, json.dumps(a).encode())
    b = two_models_report("b", "b-1", "char_js")
    retrain.put(store, json.dumps(b).encode())
    assert retrain.take(store, tmp_path / "drift.json")
    both = json.loads((tmp_path / "drift.json").read_text())
    assert retrain.drifted_models(both) == ["b", "a"]
    assert retrain.flags(both, ["a", "b"])[0] == ["--force-model", "b", "--force-model", "a"]
    assert both["drifted"] == ["b.char_js", "a.prompt_length_psi"]
    assert [c["name"] for c in both["checks"]] == ["b.char_js", "a.prompt_length_psi"]  # each its own night's
    assert retrain.merge(both, b) == both and retrain.merge(a, a) == a  # idempotent
    assert "models" not in retrain.merge(a, one)  # a one-model (whole project) request: every model

    # ct.yml: the dispatched input merged with the registry's request (`merge OTHER INTO`)
    (tmp_path / "dispatched.json").write_text(json.dumps(a))
    (tmp_path / "registry.json").write_text(json.dumps(b))
    assert retrain.main(["merge", str(tmp_path / "dispatched.json"), str(tmp_path / "registry.json")]) == 0
    assert retrain.drifted_models(json.loads((tmp_path / "registry.json").read_text())) == ["b", "a"]
    assert retrain.main(["merge", str(tmp_path / "dispatched.json"), str(tmp_path / "none.json")]) == 0
    assert json.loads((tmp_path / "none.json").read_text()) == a  # no request in the registry: the input
