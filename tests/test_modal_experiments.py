"""An A/B experiment end to end on `backend: modal`, through the Modal twin (issue 19.4): the CLI
starts it (the candidate's serve app deployed, both arms in the Dict's routing), real users on
127.0.0.1 ask the gateway with `x-mlops-user` and keep their arm, the gateway's traffic capture
is what `mlops experiment status` counts per arm, and `stop --promote-winner` moves the Dict.
Then one started with `--auto-stop --promote-winner` is stopped and promoted by the twin's
scheduled rollout controller (functions/controller.py), with no command after the users' traffic.

What is real: the CLI, the gateway (functions/gateway.py under uvicorn, capturing into the
registry's storage), each release's serve app (functions/serve.py's body, the builtin engine), the
Dict and Volume (files). The planted difference is in the users' thumbs (`mlops feedback`'s
store): the treatment's users like its answers, production's mostly do not; the two releases are
the session's trained tiny model published twice (what is under test is the plumbing, not the model).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Trained, wait_for
from test_experiments import _copy
from test_modal_twin import APP, KEY, setup_twin, twin

H = "x-mlops-release"
AUTH = {"authorization": f"Bearer {KEY}"}
CFG: dict[str, Any] = {
    "backend": "modal",
    "gates": [],
    "models": {"tiny": {"max_tokens": 4}},
    "monitor": {"flush_interval": "0.2s"},  # the gateway's capture reaches the store within 0.2 s
}
PERIOD_S = 2  # the twin's schedule for the controller (Modal's: a minute, functions/controller.py)
WAIT_S = 120.0  # the invocations (each a process start) that judge it, on a loaded 2-core machine
USERS = 48  # with 10 per arm before a look: a verdict in each of 20,000 simulated splits of 48


@pytest.mark.timeout(600)
def test_experiment_through_the_modal_twin_counts_both_arms_and_promotes_into_the_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: Trained
) -> None:
    from mlops.config import load
    from mlops.flows.session import Session
    from mlops.monitor.traffic import add_thumbs, load_window
    from mlops.rollout import promote

    tw = setup_twin(tmp_path, CFG)
    for k, v in tw.env.items():
        monkeypatch.setenv(k, v)
    s = Session.open(load(tw.root / "mlops.yaml"))
    prod, cand = (_copy(s.registry, trained.registry, trained.release) for _ in range(2))

    def routed() -> dict[str, Any]:  # what the gateway routes by: the Dict's entry
        doc = json.loads((tw.dir / "dicts" / f"{APP}-state.json").read_text())
        return dict(doc["state"][0])

    def ask(user: str) -> tuple[str, str]:
        body = {"model": "tiny", "prompt": "abc=", "max_tokens": 3}
        r = httpx.post(f"{tw.gateway}/v1/completions", json=body, headers=AUTH | {"x-mlops-user": user}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers[H], str(r.json()["id"])

    def trial(tag: str, b: str, a: str, again_n: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """USERS users ask once (the first `again_n` twice); B's users like the answer, A's one in three."""
        before = len(load_window(s.registry.store, 0).records)
        users = [f"{tag}-{i}" for i in range(USERS)]
        with ThreadPoolExecutor(4) as ex:
            first = dict(zip(users, ex.map(ask, users), strict=True))
            again = dict(zip(users[:again_n], ex.map(ask, users[:again_n]), strict=True))
        n = before + USERS + again_n
        wait_for(lambda: len(load_window(s.registry.store, 0).records) >= n, "the gateway's capture", 60)
        in_a = 0
        for rel, rid in first.values():
            add_thumbs(s.registry.store, rid, "up" if rel == b or in_a % 3 == 0 else "down")
            in_a += rel == a
        return first, again

    try:
        s.backend.prepare(prod)  # the gateway and production's serve app deployed
        promote(s.backend, prod, reason="test fixture")
        args = ("--metric", "thumbs", "--mde", "0.3", "--min-samples", "10", "--max-samples", "500")
        rec = tw.run("experiment", "start", cand, "--share", "50", *args)
        assert routed()["routing"] == {prod: 50, cand: 50} and routed()["experiment"]["id"] == rec["id"]
        assert cand in tw.serve_apps()  # deployed by start, before any user was routed to it

        first, again = trial("user", cand, prod, again_n=10)
        assert all(again[u][0] == first[u][0] for u in again), "a user changed arms"
        arm = {u: rel for u, (rel, _) in first.items()}
        assert set(arm.values()) == {prod, cand}

        status = tw.run("experiment", "status")
        a, b = status["arms"]["A"], status["arms"]["B"]
        assert (a["release"], b["release"]) == (prod, cand)
        asked = {
            rel: sum(r == rel for r in arm.values()) + sum(r == rel for r, _ in again.values()) for rel in arm.values()
        }
        assert (a["requests"], b["requests"]) == (asked[prod], asked[cand]), status  # the gateway's capture
        assert status["decision"] == "winner B" and b["mean"] == 1.0 and a["mean"] < 0.5, status
        # one observation per user, counted up to the crossing (the verdict locks there)
        assert 10 <= a["n"] <= asked[prod] and 10 <= b["n"] and a["n"] + b["n"] == status["decided_at"]

        stopped = tw.run("experiment", "stop", "--promote-winner")
        assert stopped["status"] == "promoted" and stopped["production"] == cand
        st = routed()
        assert st["routing"] == {cand: 100} and st["stages"]["production"] == cand and st["experiment"] == {}
        assert st["stages"]["previous"] == prod
        loser = next(u for u, r in arm.items() if r == prod)
        assert ask(loser)[0] == cand  # the stop returned once the gateway routed by the new Dict entry

        # --auto-stop: the twin runs the scheduled controller (functions/controller.py, deployed with
        # the gateway) every PERIOD_S; it stops the experiment at the verdict and promotes B
        (tw.dir / "schedule").write_text(str(PERIOD_S))
        auto = tw.run("experiment", "start", prod, "--share", "50", *args, "--auto-stop", "--promote-winner")
        trial("auto", prod, cand, again_n=0)
        wait_for(lambda: routed()["experiment"] == {}, "the scheduled controller to stop the experiment", WAIT_S)
        st = routed()
        assert st["routing"] == {prod: 100} and (st["stages"]["production"], st["stages"]["previous"]) == (prod, cand)
        blob = s.registry.store.get(f"experiments/tiny/{auto['id']}.json")
        assert blob is not None
        rep = json.loads(blob.data)["report"]
        assert (rep["status"], rep["decision"], rep["decided_by"]) == ("promoted", "winner B", "controller:experiment")
        assert ask("auto-0")[0] == prod
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)
