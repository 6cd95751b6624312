"""A/B experiments through a real server: users keep their arm, a planted difference reaches a
verdict and its winner is promoted (the event names who), identical releases reach none.

The server is the real local one (uvicorn in a thread, real engines, real HTTP on 127.0.0.1) with
traffic capture on, as `mlops serve` runs it; the users are an httpx client sending `x-mlops-user`;
the planted difference is real as far as the experiment can tell: the server's fault-injection
hook (mlops/serving/faults.py) answers 500 to every fifth request of production. With
`--auto-stop` the rollout controller (what `mlops serve`'s controller process runs,
`rollout_controller.for_models(...)` started, here in this process against the same server) ends
the experiment itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Trained, make_project, mlops, wait_for
from typer.testing import CliRunner

from mlops.cli.app import app
from mlops.config import load
from mlops.flows import experiment as exp
from mlops.flows.session import Session
from mlops.monitor.record import user_id
from mlops.monitor.traffic import add_thumbs, load_feedback, load_window
from mlops.registry.releases import Registry, State
from mlops.serving.faults import Fault
from mlops.serving.routing import experiment_arm, pick

pytestmark = pytest.mark.xdist_group("heavy")  # one queue with the other servers that time things

H = "x-mlops-release"
TIMEOUT = 30.0


@dataclass
class Lab:
    root: Path
    prod: str
    cand: str
    twin: str
    url: str
    opts: Any
    registry: Registry

    def session(self) -> Session:
        return Session.open(load(self.root / "mlops.yaml"))

    def served_version(self) -> int:
        return int(httpx.get(f"{self.url}/health", timeout=TIMEOUT).json()["state_version"])

    def captured(self) -> int:
        return len(load_window(self.registry.store, 0).records)


def _copy(reg: Registry, src: Registry, of: str) -> str:
    """`of`'s artifact published again in `reg` under a new id: an identical release."""
    m = src.require(of)
    rid = Registry.new_id("tiny")
    keep = {k: v for k, v in m.items() if k not in ("id", "artifact", "created_at")}
    reg.publish(rid, src.artifact_dir(of), keep)
    return rid


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> Iterator[Lab]:
    from mlops.monitor.capture import wrap
    from mlops.rollout import promote
    from mlops.serving.runner import build, start_server
    from mlops.serving.server import create_app

    over = {
        "models": {"tiny": {"max_tokens": 4}},
        "monitor": {"flush_interval": 0.05},
        "deploy": {"rollout": {"interval": "0.3s"}},  # how often an --auto-stop experiment is judged
    }
    root = make_project(tmp_path_factory.mktemp("experiments"), over)
    loaded = load(root / "mlops.yaml")
    s = Session.open(loaded)
    reg = s.registry
    # three copies of the session's trained release (no training of our own: the test budget);
    # the releases differ only where a test plants a difference
    prod, cand, twin = (_copy(reg, trained.registry, trained.release) for _ in range(3))
    promote(s.backend, prod, reason="test fixture")
    pool, opts = build(loaded, reg)
    pool.start()
    app = wrap(create_app(pool, opts), loaded, reg.store)
    try:
        with start_server(app) as url:
            yield Lab(root, prod, cand, twin, url, opts, reg)
    finally:
        app.writer.close()  # type: ignore[attr-defined]
        pool.close()


def send(lab: Lab, users: list[str]) -> dict[str, list[tuple[str, str, int]]]:
    """One completion per user, 8 at a time: user -> [(release, response id, status)]."""

    def one(user: str) -> tuple[str, str, str, int]:
        body = {"model": "tiny", "prompt": "abc=", "max_tokens": 3}
        r = httpx.post(f"{lab.url}/v1/completions", json=body, headers={"x-mlops-user": user}, timeout=TIMEOUT)
        assert r.status_code in (200, 500), r.text
        rid = r.json().get("id", "") if r.status_code == 200 else ""
        return user, r.headers[H], rid, r.status_code

    before = lab.captured()
    out: dict[str, list[tuple[str, str, int]]] = {}
    with ThreadPoolExecutor(8) as ex:
        for user, release, rid, status in ex.map(one, users):
            out.setdefault(user, []).append((release, rid, status))
    wait_for(lambda: lab.captured() >= before + len(users), "capture to write the batch")
    return out


def wait_served(lab: Lab) -> None:
    version = lab.registry.read_state()[0].version
    wait_for(lambda: lab.served_version() >= version, "the server to route by the new state")


def test_arms_are_sticky_salted_by_experiment_and_split_by_share() -> None:
    st = State(stages={"production": "a"}, routing={"a": 70, "b": 30})
    st.experiment = {"id": "exp-1", "baseline": "a", "release": "b", "share": 30, "status": "running"}
    users = [f"u{i}" for i in range(2000)]
    arms = {u: pick(st, u, counter=i) for i, u in enumerate(users)}
    assert all(pick(st, u, counter=99) == arms[u] for u in users)  # the key decides, not the request
    share_b = sum(a == "b" for a in arms.values()) / len(users)
    assert 0.26 < share_b < 0.34, share_b
    other = dict(st.experiment, id="exp-2")
    moved = sum(experiment_arm(other, u, st.routing) != arms[u] for u in users)
    assert moved > 500, "a new experiment must draw its arms anew (salted by its id)"
    assert experiment_arm(st.experiment, "u1", {"a": 100}) is None  # arms not routed: production answers


def test_identical_releases_reach_no_verdict_and_stop_keeps_production(lab: Lab) -> None:
    lab.opts.fault = None
    s = lab.session()
    rec = exp.start(s, lab.twin, 50, "thumbs", "user:test", min_samples=20, max_samples=40, unit="request")
    assert rec["baseline"] == lab.prod and rec["status"] == "running"
    wait_served(lab)
    # both arms get the same thumbs: each user's first answer up, the second down, in that order
    seen: dict[str, str] = {}
    report: dict[str, Any] = {}
    for batch in range(12):
        users = [f"null-{batch}-{i}" for i in range(16)]
        got = {u: a + b for (u, a), b in zip(send(lab, users).items(), send(lab, users).values(), strict=True)}
        for u, answers in got.items():
            assert len({r for r, _, _ in answers}) == 1, f"{u} changed arms: {answers}"
            seen[u] = answers[0][0]
            for (_, rid, _), thumb in zip(answers, ("up", "down"), strict=True):
                if batch == 0 and u.endswith("-0"):  # once through the real command
                    r = mlops("feedback", rid, "--thumbs", thumb, cwd=lab.root)
                    assert r.returncode == 0 and f"thumbs {thumb} on {rid}" in r.stdout, r.stderr
                else:
                    add_thumbs(lab.registry.store, rid, thumb)
        report = exp.analyse(s, rec)
        assert report["decision"] in ("continue", "no difference"), report
        if report["decision"] != "continue":
            break
    assert report["decision"] == "no difference", report
    assert load_feedback(lab.registry.store) == {}  # a thumb is no one's expected answer (monitor, cases)
    assert report["winner"] is None and min(report["arms"][a]["n"] for a in "AB") >= 40
    assert set(seen.values()) == {lab.prod, lab.twin}
    assert report["arms"]["A"]["mean"] == pytest.approx(0.5) and report["arms"]["B"]["mean"] == pytest.approx(0.5)
    lo, hi = report["ci"]
    assert lo < 0 < hi
    # per user (each user's first label: "up" for all): one observation per user, grouped by the
    # hash of x-mlops-user that capture recorded
    w = load_window(lab.registry.store, float(rec["started_at_s"]))
    assert {r["user"] for r in w.records if r["release"] in seen.values()} >= {user_id(u) for u in seen}
    by_user = exp.analyse(s, rec | {"unit": "user", "max_samples": 10_000})
    per_arm = {a: sum(1 for r in seen.values() if r == by_user["arms"][a]["release"]) for a in "AB"}
    assert {a: by_user["arms"][a]["n"] for a in "AB"} == per_arm, (by_user["arms"], per_arm)
    assert by_user["arms"]["A"]["mean"] == by_user["arms"]["B"]["mean"] == 1.0
    assert by_user["decision"] == "continue" and "thumbs per user" in exp.describe(by_user)
    with pytest.raises(exp.UsageError, match="already running"):
        exp.start(s, lab.cand, 50, "error_rate", "user:test")
    final = exp.stop(s, "user:test", promote_winner=True)
    assert exp.not_promoted(final) is not None  # exit 3: nothing to promote
    st = lab.registry.read_state()[0]
    assert st.stages["production"] == lab.prod and st.routing == {lab.prod: 100} and st.experiment == {}
    stored = json.loads(lab.registry.store.get(f"experiments/tiny/{rec['id']}.json").data)  # type: ignore[union-attr]
    assert stored["status"] == "stopped" and stored["report"]["decision"] == "no difference"


def test_planted_difference_reaches_a_verdict_and_the_cli_promotes_the_winner(lab: Lab) -> None:
    lab.opts.fault = Fault(lab.prod, 0.2)  # production (arm A) answers 500 to one request in five
    # a rollout and an experiment exclude each other
    lab.registry.update_state(lambda st: setattr(st, "rollout", {"id": "r1", "status": "running"}) or st, "t")
    with pytest.raises(exp.UsageError, match="a rollout of .* is running"):
        exp.start(lab.session(), lab.cand, 50, "error_rate", "user:test")
    lab.registry.update_state(lambda st: setattr(st, "rollout", {}) or st, "t")
    lease = {"owner": "pipeline:ci-42", "token": "t0", "expires_at": time.time() + 60}
    lab.registry.update_state(lambda st: setattr(st, "lease", lease) or st, "t")
    with pytest.raises(exp.UsageError, match="pipeline:ci-42 holds the rollout lease"):
        exp.start(lab.session(), lab.cand, 50, "error_rate", "user:test")
    lab.registry.update_state(lambda st: setattr(st, "lease", {}) or st, "t")

    args = ("--share", "50", "--mde", "0.1", "--min-samples", "40", "--max-samples", "2000")
    r = mlops("experiment", "start", lab.cand, "--metric", "error_rate", *args, "--json", cwd=lab.root)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    wait_served(lab)
    shown = CliRunner().invoke(app, ["status", "--config", str(lab.root / "mlops.yaml")])
    text = " ".join(shown.stdout.split())  # rich wraps at the runner's 80 columns
    assert shown.exit_code == 0 and f"experiment {rec['id']}: 50% of users to {lab.cand}" in text, text
    s = lab.session()
    report: dict[str, Any] = {}
    for batch in range(15):
        users = [f"ab-{batch}-{i}" for i in range(24)]
        for answers in send(lab, users).values():
            assert answers[0][0] in (lab.prod, lab.cand), answers
        report = exp.analyse(s, rec)
        if report["decision"] != "continue":
            break
    assert report["decision"] == "winner B" and report["winner"] == lab.cand and report["unit"] == "user", report
    assert report["arms"]["A"]["error_rate"] > 0.1 and report["arms"]["B"]["errors"] == 0

    assert report["ci"][1] < 0 and report["p_value"] <= 0.05  # B's error rate is lower, surely
    text = exp.describe(report)
    assert f"decision: winner B ({lab.cand})" in text and "95% always-valid CI [-" in text, text
    r = mlops("experiment", "stop", "--promote-winner", cwd=lab.root)
    assert r.returncode == 0, r.stderr
    assert f"production is {lab.cand}" in r.stdout
    st = lab.registry.read_state()[0]
    assert st.stages["production"] == lab.cand and st.stages["previous"] == lab.prod and st.experiment == {}
    promoted = [e for e in lab.registry.history(lab.cand) if e["event"] == "promoted"]
    assert promoted and promoted[-1]["by"].startswith("user:"), promoted
    assert promoted[-1]["detail"]["experiment"] == rec["id"]
    with pytest.raises(exp.UsageError, match="no experiment is running"):
        exp.current(s)
    last = exp.status(s)  # after the stop: the stored final report
    assert (last["id"], last["status"], last["decision"]) == (rec["id"], "promoted", "winner B")


class SameFaults:
    """The fault hook on several releases at one rate: identical releases that fail alike."""

    def __init__(self, releases: list[str], rate: float) -> None:
        self.faults = {r: Fault(r, rate) for r in releases}

    def fire(self, release: str, prompt: str = "") -> bool:
        f = self.faults.get(release)
        return f is not None and f.fire(release, prompt)


def _arms(lab: Lab) -> tuple[str, str]:
    """(production now, another of the three releases): earlier tests may have promoted one."""
    prod = str(lab.registry.read_state()[0].stages["production"])
    return prod, next(r for r in (lab.cand, lab.twin, lab.prod) if r != prod)


def _archived(lab: Lab, rec: dict[str, Any]) -> dict[str, Any]:
    blob = lab.registry.store.get(f"experiments/tiny/{rec['id']}.json")
    assert blob is not None
    return dict(json.loads(blob.data))


def _ended(lab: Lab, rec: dict[str, Any]) -> bool:
    return lab.registry.read_state()[0].experiment.get("id") != rec["id"]


def test_auto_stop_ends_at_the_verdict_and_promotes_the_winner(lab: Lab) -> None:
    from mlops.rollout_controller import for_models

    prod, cand = _arms(lab)
    lab.opts.fault = Fault(prod, 0.2)  # production (arm A) answers 500 to one request in five
    args = ("--share", "50", "--mde", "0.1", "--min-samples", "40", "--max-samples", "2000")
    r = mlops(
        "experiment", "start", cand, "--metric", "error_rate", *args, "--auto-stop", "--promote-winner", cwd=lab.root
    )
    assert r.returncode == 0, r.stderr
    assert "auto-stop: the rollout controller promotes a winning B at the test's verdict" in r.stdout, r.stdout
    rec = lab.registry.read_state()[0].experiment
    assert rec["auto_stop"] == {"promote_winner": True, "max_duration_s": None}
    wait_served(lab)
    ctl = for_models(load(lab.root / "mlops.yaml"), lab.url)[0].start()  # what `mlops serve` starts
    try:
        sent = 0
        for batch in range(15):
            if _ended(lab, rec):
                break
            sent += len(send(lab, [f"auto-{batch}-{i}" for i in range(24)]))

            def looked(n: int = sent) -> bool:  # the controller judged all of it, or ended the experiment
                last = ctl.experiments.last
                return _ended(lab, rec) or (last is not None and last["samples"] >= n)

            wait_for(looked, "the controller to judge the batch", TIMEOUT)
        wait_for(lambda: _ended(lab, rec), "the controller to stop the experiment", TIMEOUT)
    finally:
        ctl.stop()
    st = lab.registry.read_state()[0]
    assert st.stages["production"] == cand and st.stages["previous"] == prod and st.routing == {cand: 100}
    final = _archived(lab, rec)
    rep = final["report"]
    assert final["status"] == rep["status"] == "promoted"
    assert rep["stopped_by"] == rep["decided_by"] == "controller:experiment"
    assert rep["decision"] == "winner B" and rep["reason"].startswith("the sequential test decided: winner B at ")
    assert rep["ci"][1] < 0 and rep["p_value"] <= 0.05 and rep["samples"] == rep["decided_at"] >= 80
    promoted = [e for e in lab.registry.history(cand) if e["event"] == "promoted"]
    assert promoted[-1]["by"] == "controller:experiment" and promoted[-1]["detail"]["experiment"] == rec["id"]
    # `mlops experiment status --json` after the stop: the stored report, who decided and why
    r = mlops("experiment", "status", "--json", cwd=lab.root)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["id"], shown["decided_by"], shown["decision"]) == (rec["id"], "controller:experiment", "winner B")
    assert shown["effect"] == rep["effect"] and shown["ci"] == rep["ci"]


def test_auto_stop_identical_releases_run_on_until_max_duration_inconclusive(lab: Lab) -> None:
    from mlops.rollout_controller import Controller

    prod, twin = _arms(lab)
    lab.opts.fault = SameFaults([prod, twin], 0.2)  # both fail one request in five: no difference to find
    s = lab.session()
    hour = 3600.0
    rec = exp.start(s, twin, 50, "error_rate", "user:test", min_samples=20, auto_stop=True, max_duration=hour)
    wait_served(lab)
    skew = [0.0]  # the controller's clock, moved past --max-duration once the traffic was judged
    ctl = Controller(s.backend, lab.url, clock=lambda: time.time() + skew[0]).start()
    try:
        sent = 0
        for batch in range(5):
            sent += len(send(lab, [f"same-{batch}-{i}" for i in range(24)]))
            looked = lambda n=sent: (ctl.experiments.last or {}).get("samples", 0) >= n  # noqa: E731
            wait_for(looked, "a look at the batch", TIMEOUT)
            last = ctl.experiments.last
            assert last is not None and last["decision"] == "continue" and not _ended(lab, rec), last
        assert min(last["arms"][a]["errors"] for a in "AB") > 0  # both arms failed, alike
        skew[0] = hour
        wait_for(lambda: _ended(lab, rec), "the controller to stop the experiment at --max-duration", TIMEOUT)
    finally:
        ctl.stop()
    lab.opts.fault = None
    st = lab.registry.read_state()[0]
    assert st.stages["production"] == prod and st.routing == {prod: 100} and st.experiment == {}
    rep = _archived(lab, rec)["report"]
    assert (rep["status"], rep["decision"], rep["winner"]) == ("stopped", "inconclusive", None)
    assert rep["stopped_by"] == "controller:experiment" and "--max-duration 3600 s" in rep["reason"]
    assert rep["samples"] >= sent and rep["ci"][0] < 0 < rep["ci"][1]
