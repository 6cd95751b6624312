"""Issue 9 item 7: on S3 the endpoint re-reads the state on a timer, so the pipeline must wait
until the endpoint reports the state version it wrote before judging a canary step or checking who
answers. Ten normal runs against moto's S3 server (real HTTP) each exit as their verdict says."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import S3_BUCKET as BUCKET
from conftest import make_project

from mlops.config import load
from mlops.pipeline import Session
from mlops.pipeline import run as run_pipeline

S3 = {
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 8}},
    "evals": {"heldout": {"limit": 8}},
    "models": {"tiny": {"max_tokens": 4, "train": {"steps": 4}}},
}


@pytest.mark.usefixtures("moto_endpoint")
def test_ten_runs_on_s3_exit_as_their_verdict_says(tmp_path: Path) -> None:
    root = make_project(tmp_path / "s3", S3 | {"storage": f"s3://{BUCKET}/runs-{tmp_path.name}"})
    outcomes = []
    for seed in range(10):
        s = Session.open(load(root / "mlops.yaml", [f"models.tiny.train.seed={seed}"]))
        res = run_pipeline(s)
        outcomes.append((seed, res.status, res.exit_code, res.message))
        assert (res.status, res.exit_code) == ("promoted", 0), outcomes
        assert res.served_by == res.release, outcomes
        st, _ = s.registry.read_state()
        assert st.stages["production"] == res.release and st.routing == {res.release: 100}, st
