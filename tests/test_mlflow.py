"""`tracking.mlflow` against a real MLflow server (from .venv-mlflow: `make install-mlflow`) on
127.0.0.1 with a SQLite backend: a run's params, loss curve, eval metrics and report; releases as
model versions whose aliases follow promote and rollback; and a run that passes with the server
stopped, the warning in its result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, make_project, mlops, train_and_publish

from mlops.util import free_port

STARTUP_S = 180.0  # the server imports mlflow's whole stack: ~25 s on a loaded 2-core box
NAME = "tiny-reverse-tiny"  # the registered model: <project>-<model>


def mlflow_bin() -> str:
    return os.environ.get("MLOPS_MLFLOW") or str(REPO / ".venv-mlflow" / "bin" / "mlflow")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    def api(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        r = httpx.request(method, f"{self.url}/api/2.0/mlflow/{path}", timeout=30, **kw)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def aliases(self) -> dict[str, str]:
        """alias -> the mlops release its version was registered for."""
        model = self.api("GET", "registered-models/get", params={"name": NAME})["registered_model"]
        found = self.api("GET", "model-versions/search", params={"filter": f"name='{NAME}'"})["model_versions"]
        release = {v["version"]: next(t["value"] for t in v["tags"] if t["key"] == "mlops.release") for v in found}
        return {a["alias"]: release[a["version"]] for a in model.get("aliases", [])}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=10)  # a test server: no state worth a long graceful stop
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    exe = mlflow_bin()
    assert os.access(exe, os.X_OK), f"no MLflow server at {exe}: run `make install-mlflow` (or set MLOPS_MLFLOW)"
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    argv = [exe, "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination",
            str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (d / "server.log").open("wb")
    # no job executor: MLflow 3 starts seven huey consumer processes for GenAI jobs we never run
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(argv, cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"MLflow did not start in {STARTUP_S:.0f} s"
            time.sleep(0.5)  # polling a starting server, bounded by the deadline
        yield srv
    finally:
        srv.stop()
        log.close()


@pytest.fixture(scope="module")
def project(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    over = {
        "tracking": {"mlflow": {"tracking_uri": server.url}},
        # what MLflow is shown, not the canary's or ragas's time: one step, no ragas import
        "deploy": {"rollout": {"steps": [100], "requests_per_step": 5}},
        "evals": {"heldout": {"metrics": ["exact_match", "latency"]}},
    }
    return make_project(tmp_path_factory.mktemp("mlflow-project"), over)


def run_json(root: Path, *args: str) -> dict[str, Any]:
    r = mlops("run", "--json", *args, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_a_run_logs_params_curves_metrics_report_and_registers_production(server: Server, project: Path) -> None:
    res = run_json(project)
    assert res["status"] == "promoted" and res["warnings"] == []
    run = server.api("GET", "runs/get", params={"run_id": res["mlflow_run"]})["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.steps"] == "40" and params["model"] == "tiny"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"eval/heldout/exact_match", "train/loss"} <= metrics
    hist = server.api("GET", "metrics/get-history", params={"run_id": res["mlflow_run"], "metric_key": "train/loss"})
    assert len(hist["metrics"]) >= 2  # a curve, not a point (every 25 steps of 40)
    files = {f["path"] for f in server.api("GET", "artifacts/list", params={"run_id": res["mlflow_run"]})["files"]}
    assert {"report.md", "report.json"} <= files
    assert server.aliases() == {"production": res["release"]}
    found = server.api("GET", "model-versions/search", params={"filter": f"name='{NAME}'"})["model_versions"]
    assert [v["run_id"] for v in found] == [res["mlflow_run"]]  # the version links the run that trained it


def test_aliases_follow_promote_and_rollback(server: Server, project: Path) -> None:
    first = server.aliases()["production"]
    second = train_and_publish(project, seed=1)  # promoted in this process: the same set_state door
    assert server.aliases() == {"production": second, "previous": first}
    r = mlops("rollback", "--to", first, cwd=project, timeout=120)
    assert r.returncode == 0, r.stderr
    moved = server.aliases()
    assert moved["production"] == first and moved.get("previous") != first


def test_the_run_passes_with_the_server_stopped_and_says_so(server: Server, project: Path) -> None:
    server.stop()
    res = run_json(project, "--force")
    assert res["warnings"] and "unavailable" in res["warnings"][0], res
    assert res["mlflow_run"] is None
    r = mlops("releases", "--json", cwd=project, timeout=120)  # the registry, the source of truth, moved on
    assert json.loads(r.stdout)["production"] == res["production"]
