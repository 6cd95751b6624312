"""Issue 19 on `backend: modal`: the scheduled rollout controller (functions/controller.py) finishes
rollouts that `mlops deploy --no-wait` only started, through the Modal twin.

The twin runs the controller app's schedule on its clock (a `schedule` file shortens the period to
PERIOD_S), each invocation in a container process of its own, against the same registry, Dict and
gateway as the CLI. The bad candidate's CI job is the real CLI in a subprocess, exited before the
controller decides; the healthy one's is the flow `mlops deploy --no-wait` runs (`deploy_release`,
`wait=False`), in this process, which returns at once just the same.

The bad candidate is the same tiny model as production and the healthy one, published under its own
id and made to answer 5% errors on prompts starting "zq" by the serving fault hook
(mlops/serving/faults.py, given to the twin's serve stand-in through its `fault.json`): the eval
suite has no such prompt, so it passes its gates; a real client on 127.0.0.1 sending that pattern
through the gateway is what gives it away.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Trained, mlops
from test_modal_twin import APP, KEY, Twin, setup_twin, twin
from users import Users

from mlops.registry import rollouts

# one xdist queue with the other load-sensitive modules: the controller's clock and a bake
pytestmark = pytest.mark.xdist_group("heavy")

PERIOD_S = 4  # the twin's schedule (Modal's is PERIOD_S in functions/controller.py: a minute)
WAIT_S = 150.0  # a rollout's steps and bakes, and the invocations that judge them, on a loaded 2-core machine
PATTERN = "^zq"
CFG: dict[str, Any] = {
    "backend": "modal",
    "models": {"tiny": {"max_tokens": 4}},
    "evals": {"heldout": {"limit": 4, "concurrency": 2, "metrics": ["exact_match", "latency"]}},
    # the flows judge rollouts here, not eval quality: only the (generous) latency gate
    "gates": [{"eval": "heldout", "metric": "latency", "stat": "p95", "max": 60.0}],
    "monitor": {"flush_interval": "0.2s"},  # the gateway's captured requests reach the store within 0.2 s
    "deploy": {
        "rollout": {
            "steps": [50, 100],
            "requests_per_step": 8,
            "bake": "1s",
            "interval": "0.5s",
            # 5% errors against production's 0%: significant (one-sided z, p 0.012) from ~100 requests
            "analysis": {"min_requests": 100, "alpha": 0.1, "max_extensions": 60},
            # after promotion (bake_after_promote, set per rollout) the guardrail judges errors; the
            # controller app ships this file, so it is here, not a run's --set
            "guardrails": {"max_error_rate": 0.02, "min_requests": 20, "max_p95_ratio": None},
        }
    },
}


@dataclass
class Deployed:
    tw: Twin
    session: Any
    prod: str
    good: str
    bad: str

    def registry(self) -> Any:
        from mlops.config import load
        from mlops.flows.session import Session

        return Session.open(load(self.tw.root / "mlops.yaml")).registry

    def invocations(self) -> int:
        calls = self.tw.dir / "calls.log"
        return calls.read_text().split().count("schedule") if calls.is_file() else 0

    def no_wait(self, release: str, *sets: str) -> tuple[str, float]:
        """`mlops deploy --no-wait`, the CI job, a process: (the rollout it started, when it exited)."""
        args = [a for s in sets for a in ("--set", s)]
        r = mlops("deploy", "--release", release, "--no-wait", *args, cwd=self.tw.root, env=self.tw.env)
        exited = time.time()
        assert r.returncode == 0 and "started" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
        rid = next(w for w in r.stdout.split() if w.startswith("ro-"))
        return rid, exited

    def finished(self, rid: str) -> dict[str, Any]:
        """The archived record of rollout `rid`, once the twin's scheduled controller finished it."""
        reg = self.registry()
        key = rollouts.archive_key("tiny", rid)
        deadline = time.monotonic() + WAIT_S
        while reg.store.get(key) is None or reg.read_state()[0].rollout.get("id") == rid:
            if time.monotonic() > deadline:
                rec = reg.read_state()[0].rollout
                pytest.fail(
                    f"rollout {rid} not finished {WAIT_S:.0f}s after the CI job exited: nothing advanced it "
                    f"(scheduled controller invocations: {self.invocations()}; record: step {rec.get('step')}, "
                    f"applied {rec.get('applied')}, status {rec.get('status')})"
                )
            time.sleep(0.2)
        blob = reg.store.get(key)
        assert blob is not None
        return dict(json.loads(blob.data))


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> Iterator[Deployed]:
    """One project on the twin: production deployed (the gateway and the controller app with it);
    a healthy and a bad candidate, evaluated (their apps up)."""
    from mlops.config import load
    from mlops.flows.release import eval_release
    from mlops.flows.session import Session
    from mlops.rollout import promote

    tmp = tmp_path_factory.mktemp("modalctl")
    tw = setup_twin(tmp, CFG)
    art = trained.registry.artifact_dir(trained.release)  # the session's tiny model, published thrice
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tw.env.items():
            mp.setenv(k, v)
        try:
            s = Session.open(load(tw.root / "mlops.yaml"))
            ids = []
            for _ in range(3):
                rid = s.registry.new_id("tiny")
                s.registry.publish(rid, art, {"model": "tiny"})
                ids.append(rid)
            prod, good, bad = ids
            fault = {"MLOPS_FAULT_RELEASE": bad, "MLOPS_FAULT_RATE": "0.05", "MLOPS_FAULT_PATTERN": PATTERN}
            (tw.dir / "fault.json").write_text(json.dumps(fault))
            s.backend.preflight(prod)  # its app; production without a canary (the first release)
            promote(s.backend, prod, reason="test fixture", actor="test")
            for rid in (good, bad):
                assert eval_release(s, rid).passed
            # from here on the controller's period is short (not before: an idle invocation is a
            # process start, CPU the fixture's deploys need on a loaded machine)
            (tw.dir / "schedule").write_text(str(PERIOD_S))
            yield Deployed(tw, s, prod, good, bad)
        finally:
            twin("stop-all", env=tw.env, cwd=tw.root)


def test_no_wait_without_the_controller_app_fails_in_one_line(tmp_path: Path) -> None:
    """A project made before functions/controller.py existed: `--no-wait` on Modal would start a
    rollout nothing advances; it refuses, exit 1, and says how, before anything is deployed."""
    tw = setup_twin(tmp_path, CFG)
    (tw.root / "functions" / "controller.py").unlink()
    out = tw.run("deploy", "--release", "production", "--no-wait", code=1)
    err = out["stderr"].strip()
    assert len(err.splitlines()) == 1 and "mlops-tiny-reverse-controller" in err and "--wait" in err, err
    assert not (tw.dir / "apps.json").is_file() or not tw.apps()


def test_no_wait_healthy_candidate_is_promoted_by_the_scheduled_controller(dep: Deployed) -> None:
    from mlops.flows.release import deploy_release

    # what `mlops deploy --no-wait` runs, in this process (the session that evaluated it: its app
    # stays up; the CI job as a process of its own is the next test's)
    out = deploy_release(dep.session, dep.good, wait=False)
    exited = time.time()
    assert out.status == "rolling_out", out
    rid = next(w for w in out.message.split() if w.startswith("ro-"))
    rec = dep.finished(rid)
    assert "mlops-tiny-reverse-controller" in dep.tw.apps(), "deployed with the gateway"
    assert rec["status"] == "promoted" and rec["decided_by"] == "controller:analysis", rec
    assert float(rec["finished_at"]) > exited, "decided after the CI command exited"
    assert [v["verdict"] for v in rec["verdicts"]] == ["pass", "pass"], rec["verdicts"]
    st = dep.registry().read_state()[0]
    assert st.stages["production"] == dep.good and st.routing == {dep.good: 100} and not st.rollout
    assert not st.lease, "the controller gave the lease back with the record"
    assert dep.tw.ask().headers["x-mlops-release"] == dep.good  # the gateway routes by what it published


def test_candidate_bad_only_on_live_traffic_is_rolled_back_after_the_job_exited(dep: Deployed) -> None:
    prod = dep.registry().read_state()[0].stages["production"]
    auth = {"authorization": f"Bearer {KEY}"}
    with Users(dep.tw.gateway, prompt="zqabc=", max_tokens=2, headers=auth) as client:
        rid, exited = dep.no_wait(dep.bad, "deploy.rollout.traffic=live")
        rec = dep.finished(rid)
    assert rec["status"] == "rolled_back" and rec["decided_by"] == "controller:analysis", rec
    assert "error rate" in str(rec["reason"]), rec
    assert float(rec["finished_at"]) > exited
    assert client.errors > 0, "the client saw the candidate's errors"
    st = dep.registry().read_state()[0]
    assert st.stages["production"] == prod and st.routing == {prod: 100} and st.stages["canary"] is None
    events = [e for e in dep.registry().history(dep.bad) if e["event"] == "rolled_back"]
    assert events and events[-1]["by"] == "controller:analysis"
    status = dep.tw.run("status")["models"]["tiny"]  # `mlops status` shows how it ended
    assert status["production"] == prod and status["last_rollout"]["id"] == rid, status
    assert status["last_rollout"]["status"] == "rolled_back", status


def test_release_degraded_after_promotion_is_rolled_back_by_the_scheduled_guardrail(dep: Deployed) -> None:
    """The bad release passes its canary (replayed eval prompts: none starts "zq") and is promoted
    with a guardrail bake; the pattern it fails on arrives after promotion, through the gateway; the
    scheduled controller rolls it back within the bake, after the CI job exited."""
    bake = 120.0
    prod = dep.registry().read_state()[0].stages["production"]
    rid, exited = dep.no_wait(dep.bad, f"deploy.rollout.bake_after_promote={bake:g}s")
    deadline = time.monotonic() + WAIT_S
    while (rec := dep.registry().read_state()[0].rollout).get("phase") != "bake_after_promote":
        assert rec.get("id") == rid and rec.get("status", "running") == "running", rec  # the canary passes
        assert time.monotonic() < deadline, f"not promoted within {WAIT_S:.0f}s: {rec}"
        time.sleep(0.2)
    assert dep.registry().read_state()[0].stages["production"] == dep.bad
    promoted_at = float(rec["promoted_at"])
    auth = {"authorization": f"Bearer {KEY}"}
    with Users(dep.tw.gateway, prompt="zqxyz=", max_tokens=2, headers=auth) as client:
        rec = dep.finished(rid)
    assert rec["status"] == "rolled_back" and rec["decided_by"] == "controller:guardrail", rec
    assert "guardrail" in str(rec["reason"]) and "error rate" in str(rec["reason"]), rec
    assert promoted_at > exited and float(rec["finished_at"]) - promoted_at < bake, "within its bake"
    assert client.errors > 0, "the client saw the release's errors"
    st = dep.registry().read_state()[0]
    assert st.stages["production"] == prod and st.routing == {prod: 100}
    marks = [e for e in dep.registry().history(dep.bad) if e["event"] == "rolled_back"]
    assert marks[-1]["by"] == "controller:guardrail" and marks[-1]["detail"]["reasons"]


def test_an_invocation_ticks_once_when_idle_and_retries_a_failing_tick_within_its_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """controller_body's loop, on this machine (the twin test above runs it in its container): with
    nothing to advance it ticks once and returns; a tick that fails (here a damaged state file) is
    logged and tried again at the controller's pace, until the invocation's period is nearly over."""
    from conftest import make_project

    from mlops.backends.modal_controller import bundle
    from mlops.backends.modal_settings import CONTROLLER_BUNDLE_ENV, ModalSettings
    from mlops.backends.modal_twin_schedule import period_seconds
    from mlops.config import load
    from mlops.rollout_schedule import budget, run_invocation

    assert period_seconds("Period(minutes=1, seconds=30.0)") == 90 and period_seconds(None) is None
    with pytest.raises(ValueError, match="Period schedules only"):
        period_seconds("Cron('* * * * *', UTC)")
    root = make_project(tmp_path / "p", {"backend": "modal", "deploy": {"rollout": {"interval": "0.4s"}}})
    data = bundle(load(root / "mlops.yaml"))
    store = tmp_path / "registry"
    store.mkdir()

    class API:  # what the invocation asks of Modal: its bundle, the gateway's URL (never contacted here)
        settings = ModalSettings(app="mlops-tiny-reverse", storage=str(store))

        def volume_read(self, key: str) -> Iterator[bytes]:
            assert key == "controller/x.json"
            yield data

        def web_url(self, app: str, function: str) -> str:
            return "http://127.0.0.1:9"

    monkeypatch.setenv("MLOPS_API_KEY", "key-1")
    env = {CONTROLLER_BUNDLE_ENV: "controller/x.json"}
    said: list[str] = []
    t0 = time.monotonic()
    assert run_invocation(API(), 2.0, env, say=said.append) == [] and said == []
    assert time.monotonic() - t0 < budget(2.0), "idle: one tick, not the whole period"

    (store / "state.json").write_text("{damaged")
    t0 = time.monotonic()
    run_invocation(API(), 2.0, env, say=said.append)
    took = time.monotonic() - t0
    failed = [m for m in said if "tick failed" in m and "damaged" in m]
    assert len(failed) >= 2 and len(failed) == len(said), said  # tried again, at 0.1 s (interval / 4)
    assert budget(2.0) - 0.2 <= took < 2.0 + 5, took  # bounded by its period


def test_what_keeps_an_invocation_ticking() -> None:
    """A rollout the controller advances and an `--auto-stop` experiment keep an invocation ticking
    at the controller's pace; a canary its CI job drives, or a hand-stopped experiment, do not."""
    from mlops.registry.releases import State
    from mlops.rollout_schedule import needs_controller

    running = {"id": "ro-1", "status": "running", "phase": "canary"}
    assert needs_controller(State(rollout={**running, "driver": "controller"}))
    assert needs_controller(State(rollout={**running, "driver": "pipeline", "phase": "bake_after_promote"}))
    assert not needs_controller(State(rollout={**running, "driver": "pipeline"}))
    assert not needs_controller(State(rollout={**running, "driver": "controller", "status": "promoted"}))
    exp = {"id": "ex-1", "status": "running", "auto_stop": {"promote_winner": False}}
    assert needs_controller(State(experiment=exp))
    assert not needs_controller(State(experiment={**exp, "auto_stop": None}))
    assert not needs_controller(State(experiment={**exp, "status": "stopped"}))
    assert not needs_controller(State())


# --------------------------------------------------------------------------- in use across processes

HOLD = """import sys
from mlops.config import load
from mlops.flows.session import Session
Session.open(load("mlops.yaml")).backend.preflight(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # uses the release until the test closes its stdin, then exits normally
"""


@pytest.fixture(scope="module")
def elsewhere(dep: Deployed, trained: Trained) -> str:
    """A fourth release, evaluated by `mlops eval` in a process of its own, which deployed its app
    and has exited (the release is in no state: nothing but a mark would keep its app)."""
    rid = dep.session.registry.new_id("tiny")
    dep.session.registry.publish(rid, trained.registry.artifact_dir(trained.release), {"model": "tiny"})
    r = mlops("eval", "--release", rid, cwd=dep.tw.root, env=dep.tw.env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert dep.tw.deploys().count(f"{APP}-serve-{rid}") == 1
    return rid


def test_deploy_in_a_new_process_keeps_the_app_an_eval_process_deployed(dep: Deployed, elsewhere: str) -> None:
    """`mlops deploy --release X` after `mlops eval --release X`: the lease's first publish cleans
    up, and used to stop X's app (no process used it) before the preflight deployed it again, a
    needless vLLM cold start on Modal. The deploy marks X in use before it takes the lease. (Gates
    made to fail here: what follows the lease is the other tests'.)"""
    app = f"{APP}-serve-{elsewhere}"
    r = mlops("deploy", "--release", elsewhere, "--set", "gates.0.max=0.000001", cwd=dep.tw.root, env=dep.tw.env)
    assert r.returncode == 3 and "gates FAIL" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    assert app in dep.tw.apps()
    assert dep.tw.deploys().count(app) == 1, "stopped and deployed again"


def test_a_cleanup_elsewhere_keeps_an_app_a_live_process_uses_until_its_mark_is_gone(
    dep: Deployed, elsewhere: str
) -> None:
    """A second backend publishing (the scheduled controller's container, a `--wait` job's lease
    heartbeat) keeps the app of a release another live process preflighted (an eval running); once
    that process exited, or its mark expired (a process killed), the next cleanup stops it."""
    from mlops.backends.modal_settings import INUSE_KEY
    from mlops.config import load
    from mlops.flows.session import Session

    app = f"{APP}-serve-{elsewhere}"
    other = Session.open(load(dep.tw.root / "mlops.yaml")).backend  # preflighted nothing itself
    state = other.registry.read_state()[0]
    assert elsewhere not in state.referenced()
    env = os.environ | dep.tw.env | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", HOLD, elsewhere]
    holder = subprocess.Popen(cmd, cwd=dep.tw.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        ready, _, _ = select.select([holder.stdout], [], [], 180)
        assert ready and holder.stdout.readline().strip() == "held", "the holder did not preflight"
        other._publish(state)
        assert app in dep.tw.apps(), "stopped under a live process that uses it"
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    # what a killed process leaves: a mark past its expiry (the one above was dropped at its exit)
    api = other.api
    dead = {"release": elsewhere, "owner": "gone:1", "expires_at": time.time() - 1}
    api.dict_put(f"{INUSE_KEY}{elsewhere}@gone:1", dead)
    assert any(v and v["release"] == elsewhere for v in api.dict_items(INUSE_KEY).values())
    other._publish(state)
    assert app not in dep.tw.apps(), "kept though no live process uses it"
