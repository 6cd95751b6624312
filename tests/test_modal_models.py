"""Several deployed models on `backend: modal` (issue 18.1), through the Modal twin: one gateway for
both models, each routed by its own State in the Dict; a canary and a rollback of one while a real
client on 127.0.0.1 keeps asking the other, which must see no failed request and no other release.

What is real: the gateway (functions/gateway.py under uvicorn), each release's serve app
(functions/serve.py's body, the builtin engine standing in for vLLM), the Dict and Volume (files),
the registry, the eval and the canary's live analysis. To keep the test short the three releases
are one tiny model trained once here (published under each model's name): what is under test is
the routing, not the training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import make_project, train_job
from test_modal_twin import APP, KEY, Twin, setup_twin, twin
from users import Users

H = "x-mlops-release"
AUTH = {"authorization": f"Bearer {KEY}"}

CFG: dict[str, Any] = {
    "backend": "modal",
    "gates": [],  # the test is about routing: the model is the same tiny one three times
    "evals": {"heldout": {"limit": 3, "concurrency": 3}},
}


def two_models(tw: Twin) -> None:
    cfg = yaml.safe_load((tw.root / "mlops.yaml").read_text())
    tiny = cfg["models"].pop("tiny")
    cfg["models"] = {"a": tiny, "b": tiny}
    cfg["deploy"] = {
        "models": {"a": {"rollout": {"steps": [50, 100], "requests_per_step": 4}}, "b": {}},
        "rollout": {"steps": [100], "requests_per_step": 2},
    }
    (tw.root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_shared_apps_get_the_files_settings_release_apps_their_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway, train and eval apps are deployed with the same settings whichever model's
    session deploys them (else each model's run would redeploy them for the other); a release app
    gets its own model's; a deployment that gains a second model still serves the first from the
    single-model Dict entry until that model moves."""
    from test_functions import import_functions

    from mlops.backends.modal import ModalBackend
    from mlops.config import load
    from mlops.flows.session import Session
    from mlops.registry.releases import State

    root = make_project(tmp_path / "p", CFG)
    two_models(Twin(root, {"MLOPS_MODAL_TWIN": str(tmp_path / "twin")}))
    loaded = load(root / "mlops.yaml", ["deploy.models.b.resources={gpu: H100}"])
    a, b = (Session.open(loaded, model=m).backend for m in ("a", "b"))
    assert isinstance(a, ModalBackend) and isinstance(b, ModalBackend)
    assert a.settings == b.settings and a.settings.models == ("a", "b")
    assert (a.serve_settings.serve_gpu, b.serve_settings.serve_gpu) == ("L4", "H100")
    assert (a.serve_settings.served_model, b.serve_settings.served_model) == ("a", "b")
    assert a.settings.state_keys("b") == ("state:b", "routing/b/state.json")

    gw = import_functions(monkeypatch)["gateway"]
    old = State(stages={"production": "a-20260101-000000-aaaaaa"}, routing={"a-20260101-000000-aaaaaa": 100})
    new_b = State(stages={"production": "b-20260101-000000-bbbbbb"}, routing={"b-20260101-000000-bbbbbb": 100})
    entries = {"state": old.to_json(), "state:b": new_b.to_json()}

    class FakeAPI:
        settings = a.settings

        def dict_get(self, key: str) -> Any:
            return entries.get(key)

        def volume_read(self, path: str) -> Any:
            raise FileNotFoundError(path)

    readers, _ = gw.routing_sources(FakeAPI())
    assert readers["a"]().routing == old.routing and readers["b"]().routing == new_b.routing
    entries["state"] = new_b.to_json()  # the old entry is b's: a has no state yet, not b's
    readers, _ = gw.routing_sources(FakeAPI())
    assert readers["a"]().stages.get("production") is None


@pytest.mark.timeout(900)
def test_two_models_one_gateway_canary_and_rollback_of_one_while_the_other_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops.config import load
    from mlops.flows.release import deploy_release, eval_release, rollback_release
    from mlops.flows.session import Session
    from mlops.training.train import train_model

    tw = setup_twin(tmp_path, CFG)
    two_models(tw)
    for k, v in tw.env.items():
        monkeypatch.setenv(k, v)
    loaded = load(tw.root / "mlops.yaml")  # backend: modal with two models validates
    art = tmp_path / "art"
    train_model(train_job(art, steps=4))
    sess = {m: Session.open(loaded, model=m) for m in ("a", "b")}

    def publish(model: str) -> str:
        reg = sess[model].registry
        rid = reg.new_id(model)
        reg.publish(rid, art, {"model": model})
        return rid

    def ship(model: str, rid: str) -> Any:
        s = sess[model]
        assert eval_release(s, rid).passed
        return deploy_release(s, rid)

    def state(model: str) -> dict[str, Any]:
        doc = json.loads((tw.dir / "dicts" / f"{APP}-state.json").read_text())
        return dict(doc[f"state:{model}"][0])

    def ask(model: object, **headers: str) -> httpx.Response:
        body = {"model": model, "prompt": "abc=", "max_tokens": 2}
        return httpx.post(f"{tw.gateway}/v1/completions", json=body, headers=AUTH | headers, timeout=60)

    try:
        a1, b1 = publish("a"), publish("b")
        assert ship("a", a1).status == "promoted" and ship("b", b1).status == "promoted"
        assert ask("a").headers[H] == a1 and ask("b").headers[H] == b1
        assert tw.deploys().count(f"{APP}-gateway") == 1  # one gateway for both models
        listed = httpx.get(f"{tw.gateway}/v1/models", headers=AUTH, timeout=60).json()["data"]
        assert {(d["id"], d["root"]) for d in listed} == {("a", "a"), (a1, "a"), ("b", "b"), (b1, "b")}
        r = ask("zz")
        assert r.status_code == 404 and "serving: a, b" in r.json()["error"]["message"]
        assert ask(None).status_code == 400 and ask(None, **{H: b1}).headers[H] == b1  # a pin names its model
        assert ask("a", **{H: b1}).status_code == 404  # b's release is no release of a
        b_state = state("b")

        with Users(tw.gateway, "b", max_tokens=3, headers=AUTH, pause=0.05) as load_b:
            a2 = publish("a")
            out = ship("a", a2)
            assert out.status == "promoted" and [st.percent for st in out.canary] == [50, 100], out
            assert all(st.candidate["requests"] > 0 for st in out.canary)  # the gateway's stats, per release
            assert ask("a").headers[H] == a2
            back = rollback_release(sess["a"], None, "test", "test")
            assert (back.production, back.rolled_back_from) == (a1, a2)
            assert ask("a").headers[H] == a1
        assert load_b.ok >= 10 and load_b.failed == [], load_b.failed[:5]
        assert load_b.releases == {b1}  # the neighbour never moved
        assert state("b") == b_state  # a's moves never rewrote b's routing
        assert {a1, a2, b1} <= tw.serve_apps()  # a's publishes kept b's app (and a's previous)
        stats = httpx.get(f"{tw.gateway}/v1/mlops/stats", params={"model": "b"}, headers=AUTH, timeout=60).json()
        assert stats["state_version"] == b_state["version"]
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)
