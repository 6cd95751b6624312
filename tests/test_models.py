"""Several deployed models from one mlops.yaml (issue 18.1): the config forms, the registry's state
per model (the single-model layout kept, read as its model's), one server routing by `model`, and
a canary, a rollback and a sabotaged run of one model while the other serves real traffic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import deep_merge, make_project, mlops
from users import Users

from mlops.config import load, narrow, resolve_model
from mlops.errors import ConfigError, UsageError
from mlops.registry.releases import STATE_KEY, Registry
from mlops.registry.store import LocalStore

H = "x-mlops-release"


def two_models(dest: Path, deploy: dict[str, Any] | None = None) -> Path:
    """The example with two tiny GPT-2s (`a`, `b`: different seeds) deployed from one file."""
    root = make_project(dest)
    cfg = yaml.safe_load((root / "mlops.yaml").read_text())
    tiny = cfg["models"].pop("tiny")
    cfg["models"] = {"a": tiny, "b": deep_merge(tiny, {"train": {"seed": 1}})}
    cfg["evals"]["heldout"]["limit"] = 24
    # each model's own gates: a tiny model's exact match is 0 after a few seconds of training, its
    # chrF is not (0.13-0.17 measured; 0.015 after one step, the sabotage below)
    gates = [{"eval": "heldout", "metric": "ragas.chrf_score", "min": 0.05}]
    cfg["deploy"] = deploy or {
        "models": {"a": {"gates": gates}, "b": {"gates": gates, "rollout": {"requests_per_step": 6}}},
        "rollout": {"steps": [50, 100], "requests_per_step": 8},
    }
    (root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


# --------------------------------------------------------------------------- config


def test_config_forms_one_model_several_and_ambiguous(tmp_path: Path) -> None:
    root = two_models(tmp_path / "p")
    loaded = load(root / "mlops.yaml")
    assert loaded.cfg.deploy.names == ["a", "b"]
    b = narrow(loaded, "b").cfg.deploy
    assert (b.model, b.models, b.rollout.requests_per_step, b.rollout.steps) == ("b", {}, 6, [50, 100])
    assert narrow(loaded, "a").cfg.deploy.rollout.requests_per_step == 8
    with pytest.raises(UsageError, match=r"several models are deployed \(a, b\): name one with --model"):
        resolve_model(loaded, None)
    with pytest.raises(UsageError, match="model 'c' is not deployed"):
        resolve_model(loaded, "c")
    # today's single-model file: one deployed model, the config itself
    one = load(make_project(tmp_path / "one") / "mlops.yaml")
    assert one.cfg.deploy.names == ["tiny"] and narrow(one, resolve_model(one, None)) is one
    # both forms at once, or a model that does not exist: one line naming the key and the README
    with pytest.raises(ConfigError, match=r"deploy: .*not both; see README 'Several deployed models'") as e:
        load(root / "mlops.yaml", ["deploy.model=a"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"deploy.models.c: unknown model 'c'"):
        load(root / "mlops.yaml", ["deploy.models.c={}"])
    with pytest.raises(ConfigError, match=r"deploy.models.a.gates.0.eval: unknown eval 'nope'"):
        load(root / "mlops.yaml", ["deploy.models.a.gates=[{eval: nope, metric: exact_match, min: 0.1}]"])
    with pytest.raises(ConfigError, match=r"deploy.models.a.engine: unknown engine 'vlm' \(did you mean 'vllm'"):
        load(root / "mlops.yaml", ["deploy.models.a.engine=vlm"])
    with pytest.raises(ConfigError, match=r"deploy.models.a.server"):  # one server for all
        load(root / "mlops.yaml", ["deploy.models.a.server={port: 1}"])
    # every key of `deploy` but the shared ones can be set per model (a new one, e.g. vllm, too)
    from mlops.config import SHARED_KEYS, DeployCfg, DeployModelCfg

    assert set(DeployCfg.model_fields) - set(SHARED_KEYS) <= set(DeployModelCfg.model_fields)
    tuned = load(
        root / "mlops.yaml", ["deploy.vllm={enable_prefix_caching: true}", "deploy.models.a.vllm={max_model_len: 32}"]
    )
    va, vb = narrow(tuned, "a").cfg.deploy.vllm, narrow(tuned, "b").cfg.deploy.vllm
    assert (va.max_model_len, va.enable_prefix_caching, vb.max_model_len, vb.enable_prefix_caching) == (
        32,
        True,
        None,
        True,
    )
    assert [g.metric for g in narrow(loaded, "a").cfg.gates] == ["ragas.chrf_score"]
    ungated = load(root / "mlops.yaml", ["deploy.models.b={}"])
    assert narrow(ungated, "b").cfg.gates == ungated.cfg.gates  # absent: the top-level gates
    # `mlops run --force-model` (the nightly's per-model drift retrain) names deployed models the run
    # runs: refused before anything is trained
    from typer.testing import CliRunner

    from mlops.cli.app import app

    for args, said in (
        (["--force-model", "c"], "model 'c' is not deployed"),
        (["--model", "a", "--force-model", "b"], "--force-model b: this run runs only a"),
    ):
        res = CliRunner().invoke(app, ["run", "--config", str(root / "mlops.yaml"), *args])
        assert isinstance(res.exception, UsageError) and said in str(res.exception), res.output
    assert not (root / ".mlops").exists()


def _release(reg: Registry, model: str, tmp: Path) -> str:
    art = tmp / f"art-{model}"
    art.mkdir(exist_ok=True)
    (art / "config.json").write_text(json.dumps({"model": model}))
    rid = reg.new_id(model)
    reg.publish(rid, art, {"model": model})
    return rid


def test_registry_state_per_model_and_the_old_layout_read_as_its_models(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "reg")
    legacy = Registry(store)  # a registry from before several models: no scope
    a1 = _release(legacy, "a", tmp_path)

    def prod(rid: str) -> Any:
        def change(st: Any) -> Any:
            st.stages["production"], st.routing = rid, {rid: 100}
            return st

        return change

    legacy.update_state(prod(a1), "first")
    doc = json.loads((tmp_path / "reg" / STATE_KEY).read_text())
    assert doc["stages"]["production"] == a1 and "models" not in doc  # the single-model layout
    ra, rb = legacy.scoped("a"), legacy.scoped("b")
    assert ra.read_state()[0].stages["production"] == a1  # the old layout is a's
    assert rb.read_state()[0].stages["production"] is None
    ra.update_state(prod(a1), "again")  # still one model: still the single-model layout
    assert "models" not in json.loads((tmp_path / "reg" / STATE_KEY).read_text())
    b1 = _release(rb, "b", tmp_path)
    rb.update_state(prod(b1), "b's first")
    doc = json.loads((tmp_path / "reg" / STATE_KEY).read_text())
    assert sorted(doc["models"]) == ["a", "b"] and doc["models"]["a"]["stages"]["production"] == a1
    a2 = _release(ra, "a", tmp_path)
    before_b = rb.read_state()[0].to_json()
    ra.update_state(prod(a2), "a moves")
    assert ra.read_state()[0].stages["production"] == a2
    assert rb.read_state()[0].to_json() == before_b  # the neighbour untouched
    with pytest.raises(UsageError, match=r"several models are deployed \(a, b\)"):
        Registry(store).read_state()


# --------------------------------------------------------------------------- end to end


def test_two_models_canary_rollback_and_a_sabotaged_run_while_the_other_serves(tmp_path: Path) -> None:
    from mlops.config import load
    from mlops.flows.release import rollback_release
    from mlops.flows.session import Session
    from mlops.pipeline import run as run_pipeline
    from mlops.serving.runner import serve_in_thread

    root = two_models(tmp_path / "p")
    loaded = load(root / "mlops.yaml")
    first = {m: run_pipeline(Session.open(loaded, model=m)) for m in ("a", "b")}
    assert {m: r.status for m, r in first.items()} == {"a": "promoted", "b": "promoted"}, first
    a1, b1 = first["a"].release, first["b"].release
    reg = Session.open(loaded, model="a").registry.scoped(None)
    state = json.loads((root / ".mlops" / STATE_KEY).read_text())
    assert sorted(state["models"]) == ["a", "b"]

    with serve_in_thread(loaded, reg) as url:
        # one server, routed by the request's model; /v1/models lists both; unknown -> 404 listing them
        names = [d["id"] for d in httpx.get(f"{url}/v1/models").json()["data"]]
        assert {"a", "b", a1, b1} <= set(names)
        r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "abc=", "max_tokens": 2})
        assert r.status_code == 200 and r.headers[H] == a1
        r = httpx.post(f"{url}/v1/completions", json={"model": "zz", "prompt": "abc=", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "serving: a, b" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/health").json()["models"]
        assert health["a"]["stages"]["production"] == a1 and health["b"]["stages"]["production"] == b1

        with Users(url, "b") as load_b:
            # a canary of a (another seed: its gates pass), promoted while b is under load
            better = load(root / "mlops.yaml", ["models.a.train.seed=2"])
            res = run_pipeline(Session.open(better, model="a"))
            assert res.status == "promoted" and [v.percent for v in res.canary] == [50, 100], res.message
            a2 = res.release
            # a rollback of a alone (the release id names the model: no --model needed)
            back = mlops("rollback", "--json", "--to", str(a1), cwd=root)
            assert back.returncode == 0, back.stderr[-2000:]
            assert (json.loads(back.stdout)["production"], json.loads(back.stdout)["rolled_back_from"]) == (a1, a2)
            with pytest.raises(UsageError, match=f"release {b1} is a release of model 'b'"):
                rollback_release(Session.open(loaded, model="a"), b1, "test", "test")
            # the sabotaged run (CT over both): a's gate fails, a is not promoted; b is unchanged
            ct = mlops("run", "--json", "--set", "models.a.train.steps=1", cwd=root)
            assert ct.returncode == 3, ct.stderr[-2000:]
            out = json.loads(ct.stdout)["models"]
            assert (out["a"]["status"], out["b"]["status"]) == ("rejected", "unchanged"), out
            assert out["a"]["production"] == a1
            assert [g["metric"] for g in out["a"]["gates"] if not g["passed"]] == ["ragas.chrf_score"]
            r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "abc=", "max_tokens": 2})
            assert r.headers[H] == a1
        assert load_b.ok >= 20 and load_b.failed == [], load_b.failed[:5]
        assert load_b.releases == {b1}  # the neighbour never moved

    assert Session.open(loaded, model="b").registry.read_state()[0].stages["production"] == b1
    hist_b = [e["event"] for e in Session.open(loaded, model="b").registry.history(b1)]
    assert "rolled_back_to" not in hist_b and "rejected" not in hist_b
    # the PR report: a section per model
    rep = mlops("report", "--markdown", "--release", "production", cwd=root)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "## Model `a`" in rep.stdout and "## Model `b`" in rep.stdout
    rel = mlops("releases", "--json", cwd=root)
    assert rel.returncode == 1 and "several models are deployed (a, b)" in rel.stderr
    rel = mlops("releases", "--json", "--model", "b", cwd=root)
    assert rel.returncode == 0 and json.loads(rel.stdout)["production"] == b1
