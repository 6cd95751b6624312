"""`backend: modal` end to end through the local twin of Modal (mlops/backends/modal_twin.py).

What is real: the CLI, training (functions/train.py's body in its own process), each release's
serve app (functions/serve.py's body in its own process, the builtin engine standing in for vLLM,
behind a proxy that enforces requires_proxy_auth), the gateway (functions/gateway.py's ASGI app
under uvicorn), the registry, the Dict and Volume (files). What is not: Modal's cloud.
Every process the twin starts is stopped at the end of each test (`stop-all`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, make_project, mlops

KEY = "key-1"  # one of MLOPS_API_KEYS; what the runner presents as $MLOPS_API_KEY
APP = "mlops-tiny-reverse"


def twin(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The twin's `modal ...` CLI, as the README tells it."""
    return subprocess.run(
        [sys.executable, "-m", "mlops.backends.modal_twin", *args],
        cwd=cwd,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class Twin:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.dir = Path(env["MLOPS_MODAL_TWIN"])

    def run(self, *args: str, code: int | None = 0) -> dict[str, Any]:
        r = mlops(*args, "--json", cwd=self.root, env=self.env)
        assert code is None or r.returncode == code, (args, r.returncode, r.stderr[-3000:])
        return dict(json.loads(r.stdout)) if r.stdout.strip() else {"stderr": r.stderr}

    def apps(self) -> dict[str, Any]:
        p = self.dir / "apps.json"
        return dict(json.loads(p.read_text())) if p.is_file() else {}

    def serve_apps(self) -> set[str]:
        return {a.removeprefix(f"{APP}-serve-") for a in self.apps() if a.startswith(f"{APP}-serve-")}

    def deploys(self) -> list[str]:
        p = self.dir / "deploys.log"
        return p.read_text().split() if p.is_file() else []

    @property
    def gateway(self) -> str:
        return str(self.apps()[f"{APP}-gateway"]["url"])

    def ask(self, key: str | None = KEY, **headers: str) -> httpx.Response:
        h = ({"authorization": f"Bearer {key}"} if key else {}) | headers
        body = {"model": "tiny", "prompt": "abc=", "max_tokens": 4}
        return httpx.post(f"{self.gateway}/v1/completions", json=body, headers=h, timeout=60, trust_env=False)


def setup_twin(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Twin:
    """A project with `backend: modal`, and the twin set up with the README's commands."""
    cfg = {
        "backend": "modal",
        "models": {"tiny": {"train": {"steps": 80}}},
        # the fast model's exact match is ~0: its character F-score tells it from a 1-step model
        "gates": [{"eval": "heldout", "metric": "ragas.chrf_score", "min": 0.1}],
        "evals": {"heldout": {"limit": 20, "concurrency": 4}},
        "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 10}},
    }
    root = make_project(tmp_path / "p", cfg | (overrides or {}))
    shutil.copytree(REPO / "functions", root / "functions", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"MLOPS_MODAL_TWIN": str(tmp_path / "twin"), "MLOPS_API_KEY": KEY, "MLOPS_WANDB": "disabled"}
    t = Twin(root, env)
    tok = twin("proxy-token", "create", env=env, cwd=root)
    assert tok.returncode == 0, tok.stderr
    values = [
        f"MLOPS_API_KEYS={KEY},key-2",
        "MLOPS_VLLM_API_KEY=vllm-secret",
        *tok.stdout.split(),
    ]
    r = twin("secret", "create", f"{APP}-auth", *values, env=env, cwd=root)
    assert r.returncode == 0, r.stderr
    return t


@pytest.fixture
def t(tmp_path: Path) -> Iterator[Twin]:
    tw = setup_twin(tmp_path)
    try:
        yield tw
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)


def test_the_whole_modal_loop_through_the_twin(t: Twin) -> None:
    a = t.run("run")
    assert a["status"] == "promoted" and a["served_by"] == a["release"]
    ev = a["evals"]["heldout"]
    assert ev["exact_match"]["failed"] == 0 and ev["ragas.chrf_score"]["mean"] > 0  # the client had the key
    assert t.ask(key=None).status_code == 401 and t.ask(key="wrong").status_code == 401

    b = t.run("run", "--set", "models.tiny.train.seed=1")
    assert b["status"] == "promoted" and b["previous"] == a["release"]
    steps = b["canary"]
    assert [s["percent"] for s in steps] == [50, 100]
    assert all(s["candidate"]["requests"] > 0 for s in steps)  # live stats, per release, from the gateway
    assert t.ask().headers["x-mlops-release"] == b["release"]

    bad = t.run("run", "--set", "models.tiny.train.steps=1", code=3)
    assert bad["status"] == "rejected" and bad["production"] == b["release"]
    assert bad["served_by"] == b["release"] and t.ask().headers["x-mlops-release"] == b["release"]
    assert bad["release"] in t.serve_apps()  # evaluated through its own app

    before = t.deploys()
    back = t.run("rollback")
    assert back["production"] == a["release"]
    assert f"{APP}-serve-{a['release']}" not in t.deploys()[len(before) :]  # it was up: no redeploy
    assert t.ask().headers["x-mlops-release"] == a["release"]
    # production and previous stay; the rejected release's app is stopped
    assert t.serve_apps() == {a["release"], b["release"]}
