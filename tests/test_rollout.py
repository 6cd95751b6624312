"""Rollouts users can trust: a failing candidate is never promoted, a `kill -9` at any step leaves
routing and registry consistent after a rerun, a broken release is never rolled back to, every
decision is in the release's history, and shadow traffic answers from production.

The canary runs against a real server in this process (uvicorn in a thread, real engines, real
HTTP); the failing candidate is a real release made to fail 10% of its requests by the server's
fault-injection hook (MLOPS_FAULT_RELEASE / MLOPS_FAULT_RATE, see mlops/serving/faults.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Served, make_project, mlops, serving, train_and_publish, wait_for

from mlops.config import Loaded, load
from mlops.pipeline import Session
from mlops.pipeline import run as run_pipeline
from mlops.registry.releases import Registry, State
from mlops.rollout import abort_canary, canary
from mlops.serving.faults import Fault

# one xdist queue with the other load-sensitive modules (tests/conftest.py: pytest-xdist)
pytestmark = pytest.mark.xdist_group("heavy")

H = "x-mlops-release"
WAIT_S = 20.0


@dataclass
class Rollout:
    root: Path
    prod: str
    bad: str
    good: str

    def session(self, *sets: str) -> Session:
        return Session.open(load(self.root / "mlops.yaml", list(sets)))


def quiet(msg: str) -> None:
    pass


def prompts_of(loaded: Loaded) -> list[str]:
    rows = [json.loads(line) for line in (loaded.root / "evals" / "heldout.jsonl").read_text().splitlines()]
    return [loaded.cfg.models["tiny"].prompt.format(input=r["input"]) for r in rows[:40]]


def served_by(url: str, n: int = 12, prompt: str = "abc=") -> list[str]:
    out = []
    for i in range(n):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "user": f"check-{i}"}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        out.append(r.headers[H])
    return out


def consistent(reg: Registry) -> State:
    """Routing and registry agree: one document, every release it names has a manifest, weights
    sum to 100, and production has a manifest and a loadable artifact."""
    st, _ = reg.read_state()
    for rid in st.referenced():
        assert reg.manifest(rid) is not None, f"state names {rid}, which has no manifest"
    assert not st.routing or sum(st.routing.values()) == 100, st.routing
    prod = st.stages["production"]
    assert prod is not None and reg.verify(prod)
    return st


# --------------------------------------------------------------------------- canary analysis

ROLLOUT = {
    "deploy": {"rollout": {"steps": [10, 50, 100], "requests_per_step": 10}},
    "models": {"tiny": {"max_tokens": 6}},
}


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory) -> Rollout:
    root = make_project(tmp_path_factory.mktemp("rollout"), ROLLOUT)
    prod = train_and_publish(root, seed=0)
    bad = train_and_publish(root, seed=1, promote=False)
    good = train_and_publish(root, seed=2, promote=False)
    return Rollout(root, prod, bad, good)


@pytest.fixture(scope="module")
def server(rp: Rollout) -> Iterator[Served]:
    with serving(rp.root, env={"MLOPS_FAULT_RELEASE": rp.bad, "MLOPS_FAULT_RATE": "0.1"}) as s:
        assert s.opts.fault == Fault(rp.bad, 0.1)
        yield s


def test_candidate_failing_10pct_of_requests_is_never_promoted_across_20_seeded_runs(
    rp: Rollout, server: Served
) -> None:
    s = rp.session()
    cfg, prompts = s.loaded.cfg.deploy.rollout, prompts_of(s.loaded)
    for seed in range(20):
        server.opts.fault = Fault(rp.bad, 0.1, seed)  # a new phase of the error cycle per run
        steps = canary(s.backend, rp.bad, server.url, prompts, cfg, "tiny", 6, quiet, seed=seed)
        assert not all(v.passed for v in steps), f"seed {seed}: a candidate failing 10% passed every step"
        last = steps[-1]
        assert last.candidate["errors"] >= 1 and any("error rate" in r for r in last.reasons), last.to_json()
        assert all(v.candidate["errors"] == 0 for v in steps[:-1]), "only a step with errors fails"
        assert server.opts.fault.injected == sum(int(v.candidate["errors"]) for v in steps)
        abort_canary(s.backend, reason=f"canary failed: {last.reasons[0]}", actor="pipeline:analysis")
        s.registry.append_event(rp.bad, "rolled_back", by="pipeline:analysis", reasons=last.reasons)
        st = consistent(s.registry)
        assert st.stages["production"] == rp.prod and st.routing == {rp.prod: 100} and st.stages["canary"] is None
    assert "promoted" not in [e["event"] for e in s.registry.history(rp.bad)]
    assert set(served_by(server.url, 6)) == {rp.prod}

    # the same analysis passes a healthy candidate: it is not failing everything
    for seed in range(3):
        steps = canary(s.backend, rp.good, server.url, prompts, cfg, "tiny", 6, quiet, seed=seed)
        assert [v.passed for v in steps] == [True, True, True], [v.to_json() for v in steps]
        assert [v.candidate["requests"] >= max(1, 10 * v.percent // 100) for v in steps] == [True] * 3
        abort_canary(s.backend, reason="test: keep production", actor="test")


def test_every_canary_decision_is_in_the_history_with_its_numbers(rp: Rollout, server: Served) -> None:
    s = rp.session()
    cfg, prompts = s.loaded.cfg.deploy.rollout, prompts_of(s.loaded)
    steps = canary(s.backend, rp.good, server.url, prompts, cfg, "tiny", 6, quiet, seed=7)
    abort_canary(s.backend, reason="test: keep production", actor="test")
    server.opts.fault = Fault(rp.bad, 0.1, 7)
    failed = canary(s.backend, rp.bad, server.url, prompts, cfg, "tiny", 6, quiet, seed=7)
    abort_canary(s.backend, reason="canary failed", actor="pipeline:analysis")
    s.registry.append_event(rp.bad, "rolled_back", by="pipeline:analysis", reasons=failed[-1].reasons)

    r = mlops("history", rp.good, "--json", cwd=rp.root, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [e for e in json.loads(r.stdout)["history"] if e["event"] == "canary_step"][-len(steps) :]
    assert [e["detail"]["percent"] for e in events] == [10, 50, 100]
    for e, v in zip(events, steps, strict=True):
        d = e["detail"]
        assert e["by"] == d["decided_by"] == "pipeline:analysis" and d["verdict"] == "pass"
        assert d["candidate"]["requests"] == v.candidate["requests"] >= 1
        assert {"error_rate", "p50", "p95", "p99", "errors"} <= set(d["candidate"]) and "p95" in d["production"]
    last = [e for e in s.registry.history(rp.bad) if e["event"] == "canary_step"][-1]["detail"]
    assert last["verdict"] == "fail" and last["candidate"]["errors"] >= 1 and "error rate" in last["reasons"][0]
    table = mlops("history", rp.bad, cwd=rp.root, timeout=120)  # the table people read
    assert table.returncode == 0 and "canary_step" in table.stdout and "FAIL" in table.stdout
    assert "rolled_back" in table.stdout and "pipeline:analysis" in table.stdout


def test_shadow_mirrors_traffic_answers_from_production_and_records_both_outputs(rp: Rollout, server: Served) -> None:
    s = rp.session()
    log = Path(str(server.opts.shadow_log))
    since = time.time()

    def mirror(st: State) -> State:
        st.stages["canary"], st.routing, st.shadow = rp.good, {rp.prod: 100}, {"release": rp.good, "share": 0.5}
        return st

    st = s.backend.set_state(mirror, reason="test: shadow", actor="test")
    wait_for(lambda: server.pool.state().version == st.version, "the server to follow the shadow state")
    prompts = prompts_of(s.loaded)[:16]
    answers = {}
    for i, p in enumerate(prompts):  # one at a time: each generation runs alone on its engine
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": p, "max_tokens": 6, "user": f"shadow-user-{i}"},
            timeout=WAIT_S,
        )
        assert r.status_code == 200 and r.headers[H] == rp.prod, "production answers every request"
        answers[p] = r.json()["choices"][0]["text"]
    stats: dict[str, Any] = {}

    def settled() -> bool:
        stats.update(httpx.get(f"{server.url}/v1/mlops/stats", params={"since": since}, timeout=WAIT_S).json())
        return stats["shadow_pending"] == 0

    wait_for(settled, "mirrored requests to finish")
    abort_canary(s.backend, reason="test: end shadow", actor="test")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [row for row in rows if row["at"] >= since]
    assert 2 <= len(rows) <= 14, "about half the requests are mirrored"
    assert stats["shadow"][rp.good]["mirrored"] == len(rows)
    for row in rows:
        assert (row["production"], row["shadow"], row["error"]) == (rp.prod, rp.good, None)
        assert row["production_output"] == answers[row["prompt"]]
        pinned = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": rp.good, "prompt": row["prompt"], "max_tokens": 6},
            timeout=WAIT_S,
        )
        assert row["shadow_output"] == pinned.json()["choices"][0]["text"], "the candidate's own output"
        assert row["agree"] == (row["production_output"] == row["shadow_output"])

    # in a rollout, `deploy.rollout.shadow` puts a shadow step before the canary steps
    cfg = s.loaded.cfg.deploy.rollout.model_copy(update={"shadow": 0.5, "steps": [100]})
    steps = canary(s.backend, rp.good, server.url, prompts, cfg, "tiny", 6, quiet)
    abort_canary(s.backend, reason="test: keep production", actor="test")
    assert [(v.mode, v.passed) for v in steps] == [("shadow", True), ("canary", True)]
    assert steps[0].candidate["requests"] >= 5 and 0.0 <= steps[0].extra["agreement"] <= 1.0
    recorded = [e["detail"] for e in s.registry.history(rp.good) if e["event"] == "canary_step"][-2]
    assert recorded["mode"] == "shadow" and "agreement" in recorded and "disagreements" in recorded


def test_rollback_to_a_deleted_or_corrupted_release_is_refused_and_production_keeps_serving(
    rp: Rollout, server: Served
) -> None:
    corrupt = train_and_publish(rp.root, seed=5, steps=2, promote=False)
    deleted = train_and_publish(rp.root, seed=6, steps=2, promote=False)
    art = rp.root / ".mlops" / "artifacts"
    weights = art / corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    (art / deleted / "model.safetensors").unlink()
    s = rp.session()
    before = consistent(s.registry)
    for rid, why in ((corrupt, "sha256"), (deleted, "missing")):
        r = mlops("rollback", "--to", rid, cwd=rp.root, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 4 and len(lines) == 1 and rid in lines[0] and why in lines[0], r.stderr
        assert "rolled_back_to" not in [e["event"] for e in s.registry.history(rid)]
    assert s.registry.read_state()[0].version == before.version, "no pointer moved"
    assert set(served_by(server.url)) == {rp.prod}


# --------------------------------------------------------------------------- kill -9 at each step

BOUNDARIES = ["train", "registered", "served", "evaluated", "canary-0", "canary-1", "promote"]
KILL = {
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 8}},
    "evals": {"heldout": {"limit": 8}},
    "models": {"tiny": {"max_tokens": 4, "train": {"steps": 4}}},
}


# `mlops run` processes are forked from a parent that has already imported torch and transformers
# (4-5 s of a 5-7 s run here); each child runs the real CLI entry point in its own process, and
# SIGKILLs itself at the boundary named by MLOPS_TEST_KILL_AT, exactly like `python -m mlops.cli.main`.
ZYGOTE = r"""
import json, os, sys
import torch, transformers
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
import mlops.cli.main, mlops.pipeline, mlops.serving.runner, mlops.evals.harness, mlops.training.train
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["mlops", *job["args"]]
            mlops.cli.main.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    def __init__(self) -> None:
        env = os.environ | {"MLOPS_WANDB": "disabled"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready = False

    def mlops(self, *args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
        """Run the CLI in a forked child; (its exit status, -9 for SIGKILL; its output)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.ready:  # its imports ran while the fixture trained
            assert self.proc.stdout.readline().strip() == "ready"
            self.ready = True
        log = cwd / "zygote-child.log"
        self.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        done = json.loads(self.proc.stdout.readline())  # bounded by pytest-timeout
        return int(done["rc"]), log.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def killable(root: Path) -> Iterator[tuple[Path, Served, Zygote]]:
    """`root` with one release in production, a server that follows the registry (as `mlops serve`
    would), and a zygote that forks the pipeline runs a test kills."""
    zygote = Zygote()
    try:
        train_and_publish(root, seed=0)
        with serving(root) as s:
            yield root, s, zygote
    finally:
        zygote.close()


@pytest.fixture(scope="module")
def kp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served, Zygote]]:
    with killable(make_project(tmp_path_factory.mktemp("kill"), KILL)) as k:
        yield k


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_kill_9_at_a_step_boundary_then_rerun_leaves_one_production(boundary: str, kp: tuple[Path, Served]) -> None:
    root, server, zygote = kp
    seed = f"models.tiny.train.seed={100 + BOUNDARIES.index(boundary)}"  # a new candidate per case
    rc, output = zygote.mlops("run", "--set", seed, cwd=root, env={"MLOPS_TEST_KILL_AT": boundary})
    assert rc == -signal.SIGKILL, f"not killed at {boundary}: rc {rc}\n{output[-3000:]}"
    reg = Session.open(load(root / "mlops.yaml")).registry
    killed = consistent(reg)  # even mid-rollout the one state document is valid
    if boundary in ("canary-1", "promote"):
        assert killed.stages["canary"] is not None, "killed with canary weights in place"

    res = run_pipeline(Session.open(load(root / "mlops.yaml", [seed])))  # the rerun
    assert (res.status, res.exit_code) == ("promoted", 0), res.message
    st = consistent(reg)
    assert st.stages["production"] == res.release and st.routing == {res.release: 100}
    assert st.stages["canary"] is None and not st.shadow
    assert res.served_by == res.release
    wait_for(lambda: served_by(server.url, 1) == [res.release], "the server to follow the rerun")
    assert set(served_by(server.url, 16)) == {res.release}, "exactly one release serves production"
