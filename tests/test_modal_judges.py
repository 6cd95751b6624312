"""A self-hosted judge on `backend: modal`, through the local twin of Modal.

What is real: a small model trained here to answer as DeepEval's GEval expects
(`{"score": N, "reason": "..."}`) stands in for the judge; the twin deploys it as the judge's own
app (functions/serve.py with MLOPS_JUDGE, the builtin engine standing in for vLLM, behind the
proxy that wants the Proxy Auth Token); `mlops run` fans the GEval metric out to
functions/evaluate.py with `map` (a process per batch: the twin counts them), whose judge calls go
to that app; the scores come back into the eval result, the gate and the report. Removing the
judge from mlops.yaml stops its app.
"""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import mlops
from test_modal_twin import APP, CFG, Twin, setup_twin, twin

ANSWER = '{"score": 8, "reason": "ok"}'  # what GEval parses: score 8 of 10 -> 0.8
STEPS = ["Is the actual output the input reversed?"]
GEVAL = {
    "name": "deepeval.geval",
    "judge": "referee",
    "rubric_name": "reversal",
    "evaluation_steps": STEPS,
    "evaluation_params": ["input", "actual_output"],
}
CASES = 6  # two map inputs of at most 4 cases (mlops/evals/fanout.py CASES_PER_INPUT)


def geval_prompts(root: Path, n: int) -> list[str]:
    """The prompts GEval sends for the suite's cases (recorded from deepeval itself), so the
    stand-in judge learns to answer the very prompts it will be asked."""
    from mlops.env import set_offline

    set_offline()
    from deepeval.metrics import GEval
    from deepeval.models import DeepEvalBaseLLM
    from deepeval.test_case import LLMTestCase, SingleTurnParams

    seen: list[str] = []

    class Recorder(DeepEvalBaseLLM):
        def __init__(self) -> None:
            super().__init__("recorder")

        def load_model(self, *a: Any, **k: Any) -> Any:
            return self

        def get_model_name(self, *a: Any, **k: Any) -> str:
            return "recorder"

        def generate(self, prompt: Any, schema: Any = None, **k: Any) -> Any:
            seen.append(str(prompt))
            return ANSWER

        async def a_generate(self, prompt: Any, schema: Any = None, **k: Any) -> Any:
            return self.generate(prompt, schema)

    rows = [json.loads(line) for line in (root / "evals" / "heldout.jsonl").read_text().splitlines()[:n]]
    params = [SingleTurnParams.INPUT, SingleTurnParams.ACTUAL_OUTPUT]
    rng = random.Random(0)

    def garbage() -> str:  # what a barely trained release answers
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 14)))

    for r in rows:
        for out in (r["expected"], garbage(), garbage()):
            g = GEval(name="reversal", evaluation_steps=STEPS, evaluation_params=params, model=Recorder())
            g.async_mode = False
            g.measure(LLMTestCase(input=r["input"], actual_output=out), _show_indicator=False)
    return seen


def train_judge(root: Path) -> Path:
    """A 1-layer GPT-2 whose context holds a GEval prompt, trained to answer ANSWER (measured
    here: these settings answered 60 of 60 unseen GEval prompts exactly; narrower, deeper or
    shorter-trained ones broke the JSON on most)."""
    from mlops.training.train import TrainJob, train_model

    data = root / "judge.jsonl"
    prompts = geval_prompts(root, 40)
    data.write_text("".join(json.dumps({"input": p, "expected": ANSWER}) + "\n" for p in prompts))
    out = root / "judge-model"
    arch = {"n_layer": 1, "n_embd": 48, "n_head": 2, "n_positions": 1152}
    job = TrainJob(
        model_name="referee",
        dataset_path=str(data),
        out_dir=str(out),
        steps=250,
        batch_size=8,
        lr=2e-2,
        warmup_steps=5,
        threads=1,
        arch=arch,
    )
    train_model(job)
    return out


def judge_cfg() -> dict[str, Any]:
    return CFG | {
        "gates": [{"eval": "heldout", "metric": "deepeval.geval", "min": 0.5}],
        "evals": {"heldout": {"limit": CASES, "concurrency": 4, "metrics": ["exact_match", GEVAL]}},
        "judges": {
            "referee": {"source": "judge-model", "model": "referee", "max_tokens": 40, "timeout_s": 120, "gpu": "L4"}
        },
        "deploy": {"rollout": {"steps": [100], "requests_per_step": 4}},
    }


def map_calls(t: Twin) -> list[str]:
    p = t.dir / "calls.log"
    return p.read_text().splitlines() if p.is_file() else []


@pytest.mark.timeout(1200)  # a judge trained (~1 min), one run and one eval through the twin (~3-6 min loaded)
def test_a_self_hosted_judge_scores_through_the_eval_function(tmp_path: Path) -> None:
    t = setup_twin(tmp_path, judge_cfg())
    train_judge(t.root)
    judge_app = f"{APP}-judge-referee"
    try:
        a = t.run("run")
        assert a["status"] == "promoted", a
        listed = twin("app", "list", env=t.env, cwd=t.root)
        assert judge_app in listed.stdout.split(), listed.stdout  # its own app, as a release has
        assert map_calls(t) == [f"map {APP}-eval/score"] * 2  # two batches of cases, one input each
        ev = a["evals"]["heldout"]["deepeval.geval"]
        assert ev["n"] == CASES and ev["failed"] < CASES and ev["mean"] > 0.5, ev  # the judge's 8/10
        report = mlops("report", "--release", a["release"], "--markdown", cwd=t.root, env=t.env)
        assert report.returncode == 0 and "deepeval.geval" in report.stdout, report.stderr[-2000:]

        # a judge answer that does not parse is a failed case with its reason, never a silent 0
        stored = json.loads((t.root / ".mlops" / "releases" / a["release"] / "evals" / "heldout.json").read_text())
        for case in stored["cases"]:
            if "deepeval.geval" in case["failed"]:
                assert case["scores"]["deepeval.geval"] == 0.0 and case["reasons"]["deepeval.geval"], case

        # no longer declared: its app is stopped by the next eval
        cfg = yaml.safe_load((t.root / "mlops.yaml").read_text())
        del cfg["judges"]
        cfg["evals"]["heldout"]["metrics"] = ["exact_match"]
        cfg["gates"] = [{"eval": "heldout", "metric": "exact_match", "min": 0.0}]
        (t.root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        t.run("eval", "--release", str(a["release"]))
        assert judge_app not in t.apps()
        assert len(map_calls(t)) == 2  # nothing heavy left to fan out
    finally:
        twin("stop-all", env=t.env, cwd=t.root)


def test_a_judge_app_is_redeployed_when_its_model_changes_and_sources_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployed when what it would serve changes (like a release's app), not on every eval; the
    model staged on the Volume with a manifest the container checks; a source that is neither a
    directory, a release nor a Hub id is a one-line config error."""
    from mlops.backends.modal import ModalBackend
    from mlops.backends.modal_eval import _model, sync_judges
    from mlops.config import load
    from mlops.errors import ConfigError, InfraError
    from mlops.registry.releases import Registry, tree_sha256
    from mlops.registry.store import LocalStore

    t = setup_twin(tmp_path, judge_cfg())
    for k, v in t.env.items():
        monkeypatch.setenv(k, v)
    model = t.root / "judge-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    (model / "model.safetensors").write_bytes(b"weights v1")  # it need not load: deploys are counted
    backend = ModalBackend(load(t.root / "mlops.yaml"), Registry(LocalStore(t.root / ".mlops")))
    app = f"{APP}-judge-referee"
    try:
        assert sync_judges(backend) == {"referee": app}
        sync_judges(backend)
        assert t.deploys() == [app]  # unchanged: deployed once
        staged = t.dir / "volumes" / f"{APP}-artifacts" / "judges" / "referee"
        manifest = json.loads((staged / "manifest.json").read_text())
        assert manifest["artifact"]["sha256"] == tree_sha256(manifest["artifact"]["files"])
        assert (staged / "model" / "model.safetensors").read_bytes() == b"weights v1"
        assert (
            t.apps()[app]["env"]["MLOPS_SERVE_GPU"] == "L4" and t.apps()[app]["env"]["MLOPS_JUDGE_MODEL"] == "referee"
        )

        (model / "model.safetensors").write_bytes(b"weights v2")
        sync_judges(backend)
        assert t.deploys() == [app, app]
        assert (staged / "model" / "model.safetensors").read_bytes() == b"weights v2"

        # a judge that died at start fails the eval at once with its log, rather than after the
        # eval function has waited out the start-up timeout (960 s) for its /health
        from mlops.backends.modal_eval import remote_scoring
        from mlops.evals.harness import build_metrics
        from mlops.evals.types import Case, Output

        deadline = time.monotonic() + 120
        while backend.api.failure(app) is None and time.monotonic() < deadline:
            time.sleep(0.5)  # bounded: the stand-in server loads torch before it gives up
        metrics, clients = build_metrics(backend.loaded, "heldout")
        swapped = remote_scoring(backend)("heldout", metrics, clients)
        t0 = time.monotonic()
        with pytest.raises(InfraError, match=f"the judge app {app}: .*did not load"):
            swapped[1].score_batch([Case("a", "abc", "cba")], [Output("cba")])
        assert time.monotonic() - t0 < 120 and f"{APP}-eval" in t.apps()
    finally:
        twin("stop-all", env=t.env, cwd=t.root)

    rid = "referee-20250101-000000-abcdef"
    backend.registry.publish(rid, model, {"model": "referee", "config": {"prompt": "Judge: {input}"}})
    from_release = backend.cfg.judges["referee"].model_copy(update={"source": f"release:{rid}"})
    path, artifact, prompt = _model(backend, "referee", from_release)
    assert path is not None and (path / "model.safetensors").read_bytes() == b"weights v2"
    assert artifact["sha256"] == backend.registry.require(rid)["artifact"]["sha256"] and prompt == "Judge: {input}"
    hub = _model(backend, "referee", backend.cfg.judges["referee"].model_copy(update={"source": "org/judge-7b"}))
    assert hub[0] is None and hub[1]["hf"] == "org/judge-7b"
    with pytest.raises(ConfigError, match=r"judges.referee.source: './nowhere' is neither a directory"):
        _model(backend, "referee", backend.cfg.judges["referee"].model_copy(update={"source": "./nowhere"}))
