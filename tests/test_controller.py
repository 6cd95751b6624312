"""Issue 19: the rollout controller in a running `mlops serve` finishes rollouts the CI job only started.

One real `mlops serve` (its controller child process) follows one project's registry. The CI commands
(`mlops run --no-wait`, a `mlops run` killed mid-canary, `mlops rollback`) are the real CLI in
processes forked from a pre-imported zygote (tests/test_rollout.py), exited before the controller
decides; where the gates are not the subject, the rollout is started by the flow `--no-wait` ends
in (`hand_off`), in this process, which returns at once just the same. The "bad" candidate is a real
release made to answer 5% errors only on prompts starting "zq" (the server's fault hook with a
pattern, mlops/serving/faults.py): the eval suite has no such prompt, so it passes its gates and a
replayed canary; a real client on 127.0.0.1 sending that pattern is what gives it away. The hook
fails the requests mirrored to it in a shadow step the same way (the user still gets production's
answer), which is how a shadow step stops it before any user sees it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import make_project, mlops, mlops_serve, train_and_publish, wait_for
from test_rollout import Zygote
from test_rollout_process import controller_children, one_child, wait_until
from users import Users

from mlops.config import load
from mlops.flows.stages import hand_off
from mlops.pipeline import Session
from mlops.registry import rollouts
from mlops.registry.releases import Registry, State
from mlops.rollout_start import where

# one xdist queue with the other load-sensitive modules (tests/conftest.py: lease expiry, timings)
pytestmark = pytest.mark.xdist_group("heavy")

WAIT_S = 90.0  # a rollout's steps, bakes and a lease expiry on a loaded 2-core machine
TTL_S = 4.0
CTL = {
    "deploy": {
        "rollout": {
            "steps": [50, 100],
            "requests_per_step": 8,
            "bake": "1s",
            "interval": "0.5s",
            "lease_ttl": f"{TTL_S}s",
            "lease_wait": "60s",
            # 5% errors against production's 0%: significant (one-sided z, p 0.012) from ~100 requests
            "analysis": {"min_requests": 100, "alpha": 0.1, "max_extensions": 60},
            # the guardrail judges errors here, and the prompts' lengths against the canary's (their
            # PSI); latency on a loaded 2-core machine is not the subject
            "guardrails": {
                "max_error_rate": 0.02,
                "min_requests": 20,
                "max_p95_ratio": None,
                "monitor": {"prompt_length_psi": 0.5},
            },
        }
    },
    "monitor": {"flush_interval": "0.2s"},  # captured requests reach the store within 0.2 s
    "evals": {"heldout": {"limit": 8}},
    "models": {"tiny": {"max_tokens": 4, "train": {"steps": 4}}},
    # the flows judge rollouts here, not eval quality: only the (generous) latency gate
    "gates": [{"eval": "heldout", "metric": "latency", "stat": "p95", "max": 60.0}],
}
PATTERN = "^zq"


@dataclass
class Ctl:
    root: Path
    url: str
    prod: str
    good: str
    bad: str
    zygote: Zygote

    def registry(self) -> Registry:
        return Session.open(load(self.root / "mlops.yaml")).registry

    def state(self) -> State:
        return self.registry().read_state()[0]

    def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
        """The CI command; (exit code, output, when it exited)."""
        rc, out = self.zygote.mlops(*args, cwd=self.root, env=env or {})
        return rc, out, time.time()

    def hand_off(self, release: str, *sets: str) -> str:
        """What `--no-wait` does once the gates passed: start the rollout, return; its id."""
        s = Session.open(load(self.root / "mlops.yaml", list(sets)))
        return started(hand_off(s, release, started_by="test"))

    def finished(self, rid: str) -> dict[str, object]:
        """The archived record of rollout `rid`, once the controller finished it."""
        key = rollouts.archive_key("tiny", rid)

        def done() -> bool:  # archived, and cleared from the state
            return self.registry().store.get(key) is not None and self.state().rollout.get("id") != rid

        wait_for(done, f"rollout {rid} to finish", WAIT_S, 0.1)
        blob = self.registry().store.get(key)
        assert blob is not None
        return dict(json.loads(blob.data))


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctl]:
    root = make_project(tmp_path_factory.mktemp("controller"), CTL)
    zygote = Zygote()  # imports torch while the releases train
    prod = train_and_publish(root, seed=0)
    good = train_and_publish(root, seed=1, promote=False)
    bad = train_and_publish(root, seed=2, promote=False)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"MLOPS_FAULT_RELEASE": bad, "MLOPS_FAULT_RATE": "0.05", "MLOPS_FAULT_PATTERN": PATTERN}.items():
            mp.setenv(k, v)
        serve = mlops_serve(root, loaded=True, log=root / "serve.log")
        url = serve.__enter__()
    try:
        yield Ctl(root, url, prod, good, bad, zygote)
    finally:
        serve.__exit__(None, None, None)
        zygote.close()
        wait_until(lambda: not controller_children(url), "the controller child to stop with the server")


def started(output: str) -> str:
    """The rollout id a `--no-wait` command printed."""
    for word in output.split():
        if word.startswith("ro-"):
            return word
    raise AssertionError(f"no rollout id in:\n{output[-3000:]}")


def test_no_wait_returns_and_the_controller_in_mlops_serve_promotes(ctl: Ctl) -> None:
    rc, out, exited = ctl.run("run", "--no-wait", "--set", "models.tiny.train.seed=1")
    assert rc == 0, out[-3000:]
    assert "rolling_out" in out and ctl.good in out, out[-2000:]
    rid = started(out)
    rec = ctl.finished(rid)
    assert rec["status"] == "promoted" and rec["decided_by"] == "controller:analysis", rec
    assert float(str(rec["finished_at"])) > exited, "decided after the CI command exited"
    assert [v["verdict"] for v in rec["verdicts"]] == ["pass", "pass"]  # type: ignore[union-attr]
    st = ctl.state()
    assert st.stages["production"] == ctl.good and st.routing == {ctl.good: 100} and not st.rollout
    assert not st.lease, "the controller gave the lease back with the record"
    status = mlops("status", "--json", cwd=ctl.root)
    doc = json.loads(status.stdout)["models"]["tiny"]
    assert doc["production"] == ctl.good and doc["rollout"] is None and doc["last_rollout"]["id"] == rid


def test_candidate_bad_only_on_live_traffic_is_rolled_back_after_the_job_exited(ctl: Ctl) -> None:
    prod = ctl.state().stages["production"]
    rid = ctl.hand_off(ctl.bad, "deploy.rollout.traffic=live")
    exited = time.time()
    with Users(ctl.url, prompt="zqabc=", max_tokens=2) as client:
        rec = ctl.finished(rid)
    assert rec["status"] == "rolled_back" and rec["decided_by"] == "controller:analysis", rec
    assert "error rate" in str(rec["reason"]), rec
    assert float(str(rec["finished_at"])) > exited
    assert client.errors > 0, "the client saw the candidate's errors"
    st = ctl.state()
    assert st.stages["production"] == prod and st.routing == {prod: 100} and st.stages["canary"] is None
    events = [e for e in ctl.registry().history(ctl.bad) if e["event"] == "rolled_back"]
    assert events and events[-1]["by"] == "controller:analysis"


def test_release_degraded_after_promotion_is_rolled_back_by_the_guardrail(ctl: Ctl) -> None:
    prod = ctl.state().stages["production"]
    rid = ctl.hand_off(ctl.bad, "deploy.rollout.bake_after_promote=60s")  # replayed eval prompts: it passes

    def baking() -> bool:
        st = ctl.state()
        assert st.rollout.get("status", "running") == "running", st.rollout  # replayed eval prompts pass
        return st.rollout.get("phase") == "bake_after_promote"

    wait_for(baking, "the bad release promoted and baking", WAIT_S, 0.1)
    assert ctl.state().stages["production"] == ctl.bad
    assert prod in httpx.get(f"{ctl.url}/health", timeout=30).json()["loaded"], "the previous release stays warm"
    promoted_at = float(ctl.state().rollout["promoted_at"])
    with Users(ctl.url, prompt="zqxyz=", max_tokens=2):  # the traffic pattern it fails on arrives after promotion
        rec = ctl.finished(rid)
    assert rec["status"] == "rolled_back" and rec["decided_by"] == "controller:guardrail", rec
    assert "guardrail" in str(rec["reason"]) and "error rate" in str(rec["reason"])
    assert float(str(rec["finished_at"])) - promoted_at < 60, "rolled back within bake_after_promote"
    st = ctl.state()
    assert st.stages["production"] == prod and st.routing == {prod: 100}
    marks = [e for e in ctl.registry().history(ctl.bad) if e["event"] == "rolled_back"]
    assert marks[-1]["by"] == "controller:guardrail" and marks[-1]["detail"]["reasons"]


def test_pipeline_killed_mid_canary_is_aborted_by_the_controller_when_its_lease_expires(ctl: Ctl) -> None:
    prod = ctl.state().stages["production"]
    rc, out, killed_at = ctl.run(
        "run",
        "--set",
        "models.tiny.train.seed=5",
        "--set",
        "deploy.rollout.bake=0",
        env={"MLOPS_TEST_KILL_AT": "canary-1"},
    )
    assert rc == -signal.SIGKILL, out[-3000:]
    st = ctl.state()
    rec = dict(st.rollout)
    assert rec["driver"] == "pipeline" and st.routing == {prod: 50, rec["release"]: 50}, st.to_json()
    done = ctl.finished(str(rec["id"]))
    assert done["status"] == "aborted" and done["decided_by"] == "controller", done
    assert "stopped renewing" in str(done["reason"]), done
    assert float(str(done["finished_at"])) >= killed_at + TTL_S - 1.5, "never before the dead run's lease expired"
    st = ctl.state()
    assert st.routing == {prod: 100} and st.stages["canary"] is None and not st.rollout


def test_operator_rollback_pre_empts_the_controller(ctl: Ctl) -> None:
    prod = ctl.state().stages["production"]
    rid = ctl.hand_off(ctl.bad, "deploy.rollout.bake=600s")
    wait_for(lambda: len(ctl.state().routing) == 2, "the controller to set step 1", WAIT_S, 0.1)
    assert ctl.state().lease["owner"].startswith("controller@")
    doctor = mlops("doctor", cwd=ctl.root)  # a live lease held by a rollout: reported, not damage
    assert doctor.returncode == 0 and f"rollout in progress: model tiny, {rid}" in doctor.stdout, doctor.stdout
    rc, out, _ = ctl.run("rollback", "--to", str(prod), "--reason", "operator says no")
    assert rc == 0, out[-3000:]
    rec = ctl.finished(rid)
    assert rec["status"] == "aborted" and "operator says no" in str(rec["reason"]), rec
    st = ctl.state()
    version = st.version
    assert st.routing == {prod: 100} and not st.rollout and not st.lease
    time.sleep(2.0)  # several controller ticks: it must not write again (nothing to wait for)
    assert ctl.state().version == version, ctl.state().to_json()


def test_a_killed_controller_child_is_replaced_and_the_new_one_finishes_the_next_rollout(ctl: Ctl) -> None:
    first = one_child(ctl.url)  # mlops serve's controller runs in a child process (mlops/rollout_process.py)
    os.kill(first, signal.SIGKILL)
    one_child(ctl.url, other_than=first)
    prod = ctl.state().stages["production"]
    release = ctl.prod if prod != ctl.prod else ctl.good
    rec = ctl.finished(ctl.hand_off(release))
    assert rec["status"] == "promoted" and rec["decided_by"] == "controller:analysis", rec
    assert ctl.state().stages["production"] == release


def test_no_wait_shadow_stops_a_candidate_bad_on_mirrored_traffic_before_any_user_sees_it(ctl: Ctl) -> None:
    prod = ctl.state().stages["production"]
    since = time.time()
    rid = ctl.hand_off(ctl.bad, "deploy.rollout.shadow=0.5", "deploy.rollout.traffic=live")
    seen: list[State] = []

    def mirroring() -> bool:  # the controller's shadow phase, with what it mirrored so far
        st = ctl.state()
        assert st.rollout.get("id") == rid, f"the rollout ended before its shadow phase was seen: {st.to_json()}"
        seen[:] = [st]
        return st.rollout.get("phase") == "shadow" and bool((st.rollout.get("mirrored") or {}).get("mirrored"))

    with Users(ctl.url, prompt="zqabc=", max_tokens=2) as client:
        wait_for(mirroring, "the controller to mirror traffic to the candidate", WAIT_S, 0.05)
        st = seen[0]
        assert st.shadow == {"release": ctl.bad, "share": 0.5} and st.routing == {prod: 100}, st.to_json()
        assert st.lease["owner"].startswith("controller@"), "mirrored in the write that took the lease"
        line = where(st)  # what `mlops status` prints for it
        assert "shadow step: 50% of production's traffic mirrored" in line and " mirrored, agreement " in line, line
        rec = ctl.finished(rid)
    assert rec["status"] == "rolled_back" and rec["decided_by"] == "controller:analysis", rec
    assert str(rec["reason"]).startswith("aborted in shadow: ") and "error rate" in str(rec["reason"]), rec
    [v] = rec["verdicts"]  # type: ignore[misc]
    assert v["mode"] == "shadow" and v["verdict"] == "fail" and v["candidate"]["requests"] >= 100, v
    # the candidate never answered a user: no user request in its per-release stats, every answer production's
    stats = httpx.get(f"{ctl.url}/v1/mlops/stats", params={"since": since}, timeout=30).json()
    assert stats["releases"].get(ctl.bad, {}).get("requests", 0) == 0, stats["releases"]
    assert stats["shadow"][ctl.bad]["errors"] > 0, stats["shadow"]
    assert client.releases == {prod} and client.errors == 0, (client.releases, client.failed[:3])
    st = ctl.state()
    assert st.routing == {prod: 100} and not st.shadow and st.stages["canary"] is None and not st.lease


def test_no_wait_shadow_then_canary_promotes_a_healthy_candidate(ctl: Ctl) -> None:
    healthy = ctl.prod if ctl.state().stages["production"] != ctl.prod else ctl.good  # whichever is not serving
    rid = ctl.hand_off(healthy, "deploy.rollout.shadow=0.5")  # replayed eval prompts, mirrored at 50%
    rec = ctl.finished(rid)
    assert rec["status"] == "promoted" and rec["decided_by"] == "controller:analysis", rec
    verdicts = rec["verdicts"]
    assert [(v["mode"], v["verdict"]) for v in verdicts] == [("shadow", "pass"), ("canary", "pass"), ("canary", "pass")]  # type: ignore[union-attr]
    shadow = verdicts[0]  # type: ignore[index]
    assert shadow["candidate"]["requests"] >= 4 and shadow["shadow_share"] == 0.5 and "agreement" in shadow, shadow
    st = ctl.state()
    assert st.stages["production"] == healthy and st.routing == {healthy: 100} and not st.shadow
    steps = [e["detail"] for e in ctl.registry().history(healthy) if e["event"] == "canary_step"]
    assert steps[-3]["mode"] == "shadow" and steps[-3]["rollout"] == rid, steps[-3:]


def test_a_controller_that_did_not_see_the_canary_judges_the_guardrail_psi_against_it(ctl: Ctl) -> None:
    """On Modal every scheduled invocation is a new controller (functions/controller.py); here the
    controller child is killed after promotion, and its replacement never saw the live canary. It
    reads production's side of the canary back from the captures of the window the record names,
    so a shift of the prompts' lengths after promotion (the PSI guardrail) still rolls back."""
    healthy = ctl.prod if ctl.state().stages["production"] != ctl.prod else ctl.good
    prod = ctl.state().stages["production"]
    rid = ctl.hand_off(healthy, "deploy.rollout.traffic=live", "deploy.rollout.bake_after_promote=60s")

    def baking() -> bool:
        rec = ctl.state().rollout
        assert rec.get("id") == rid and rec.get("status") == "running", rec  # the live canary passes
        return rec.get("phase") == "bake_after_promote"

    with Users(ctl.url, prompt="abc=", max_tokens=2):  # live traffic of short prompts judges the canary
        wait_for(baking, "the live canary to pass and the release to bake", WAIT_S, 0.1)
    rec = ctl.state().rollout
    since, until = rec["baseline_window"]  # production's last window with enough requests: step 1's
    assert float(rec["started_at"]) <= since < until <= float(rec["promoted_at"]), rec
    first = one_child(ctl.url)
    os.kill(first, signal.SIGKILL)  # its memory of the canary goes with it
    one_child(ctl.url, other_than=first)
    with Users(ctl.url, prompt="abcdefghabcdefgh=", max_tokens=2) as client:
        done = ctl.finished(rid)
    assert done["status"] == "rolled_back" and done["decided_by"] == "controller:guardrail", done
    assert "prompt_length_psi" in str(done["reason"]) and "error rate" not in str(done["reason"]), done
    assert float(str(done["finished_at"])) - float(str(done["promoted_at"])) < 60, "within its bake"
    assert client.ok > 0 and ctl.state().routing == {prod: 100}


def test_after_a_replayed_canary_the_guardrail_psi_compares_with_production_before_the_rollout(ctl: Ctl) -> None:
    """A canary on replayed eval prompts has no live window of production's: the guardrail's length
    PSIs compare the promoted release's live traffic with production's before the rollout began."""
    healthy = ctl.prod if ctl.state().stages["production"] != ctl.prod else ctl.good
    prod = ctl.state().stages["production"]
    from mlops.rollout_analysis import read_window

    t0 = time.time()

    def captured() -> bool:  # production's live answers, in the store (flushed every 0.2 s)
        return read_window(ctl.registry(), healthy, prod, t0, time.time()).production.requests >= 40

    with Users(ctl.url, prompt="abc=", max_tokens=2):  # production's live traffic
        wait_for(captured, "production's live traffic to be captured", WAIT_S, 0.2)
    rid = ctl.hand_off(healthy, "deploy.rollout.bake_after_promote=60s")  # replayed eval prompts
    wait_for(lambda: ctl.state().rollout.get("phase") == "bake_after_promote", "the bake", WAIT_S, 0.1)
    assert "baseline_window" not in ctl.state().rollout, "no live canary window"
    with Users(ctl.url, prompt="abcdefghabcdefgh=", max_tokens=2):
        done = ctl.finished(rid)
    assert done["status"] == "rolled_back" and done["decided_by"] == "controller:guardrail", done
    assert "prompt_length_psi" in str(done["reason"]), done
    assert ctl.state().routing == {prod: 100}


def test_the_guardrail_goes_on_from_where_a_stopped_controller_left_off(ctl: Ctl) -> None:
    """A controller that stops (a scheduled invocation's end) saves where its guardrail's next window
    starts; the next one judges from there, not again from promotion."""
    from mlops.rollout_controller import for_models
    from mlops.rollout_guard import guard

    healthy = ctl.prod if ctl.state().stages["production"] != ctl.prod else ctl.good
    rid = ctl.hand_off(healthy, "deploy.rollout.bake_after_promote=8s")  # replayed eval prompts: it passes
    wait_for(lambda: ctl.state().rollout.get("phase") == "bake_after_promote", "the bake", WAIT_S, 0.1)
    promoted_at = float(ctl.state().rollout["promoted_at"])
    [one] = for_models(load(ctl.root / "mlops.yaml"), ctl.url)  # as an invocation opens it
    one._checkpoint[rid] = promoted_at + 3.0  # it judged the bake's first 3 s: nothing breached
    one.stop()
    assert ctl.state().rollout["guard_checkpoint"] == promoted_at + 3.0
    [nxt] = for_models(load(ctl.root / "mlops.yaml"), ctl.url)
    assert guard(nxt, ctl.state().rollout, promoted_at + 3.1) is None  # less than an interval since
    assert nxt._checkpoint[rid] == promoted_at + 3.0
    assert ctl.finished(rid)["status"] == "promoted"
