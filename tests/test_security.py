"""Secrets are referenced by name and never written; the endpoint is not open by default."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_project, mlops

PLANTED = "sk-planted-7f3a9c1e-never-write-me"


def test_planted_key_reaches_no_output_file_or_log(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", {"deploy": {"server": {"api_key_env": "MLOPS_TEST_API_KEY"}}})
    env = {"MLOPS_TEST_API_KEY": PLANTED, "MLOPS_WANDB": ""}  # W&B offline on: its run files are searched too
    cfg = (root / "mlops.yaml").read_text().replace("mode: disabled", "mode: offline")
    (root / "mlops.yaml").write_text(cfg)
    run = mlops("run", "--json", cwd=root, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "promoted"  # the eval authenticated with the key
    outputs = [run.stdout, run.stderr]
    for args in (["releases", "--json"], ["report", "--release", "production", "--json"], ["validate", "--json"]):
        r = mlops(*args, cwd=root, env=env)
        assert r.returncode == 0, r.stderr
        outputs += [r.stdout, r.stderr]
    files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert any("wandb" in p.parts for p in files), "W&B offline files exist and were searched"
    leaked = [str(p) for p in files if PLANTED.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert all(PLANTED not in o for o in outputs)
    assert any("MLOPS_TEST_API_KEY" in p.read_text(errors="ignore") for p in files if p.name == "mlops.yaml")


def test_non_loopback_bind_needs_a_key(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    r = mlops("serve", "--host", "0.0.0.0", "--port", "0", cwd=root, timeout=120)
    assert r.returncode == 1
    assert "refusing to bind 0.0.0.0 without an API key" in r.stderr and r.stderr.strip().count("\n") == 0
