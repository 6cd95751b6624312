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
