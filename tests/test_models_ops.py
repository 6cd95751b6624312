"""Several deployed models (issue 18.1), the operations side: `mlops monitor` per model (capture
records name the model that answered) and `mlops doctor --repair` of one model's damaged state.

No server here: the capture writer writes real records into the registry's storage, as the local
server and the Modal gateway do; `mlops` runs as a subprocess on them.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pytest
from conftest import mlops
from test_models import two_models

from mlops.config import load
from mlops.monitor import retrain
from mlops.monitor.capture import CaptureWriter, Exchange
from mlops.registry.releases import Registry
from mlops.registry.store import LocalStore

N = 40  # requests per model: over monitor.min_requests (30), so each model's traffic is judged
A = "a-20260101-000000-aaaaaa"
B = "b-20260101-000000-bbbbbb"
OFF = ["--set", "monitor.embedding_sample=0"]  # MiniLM is not what is under test


def inputs(root: Path, n: int, seed: int, shifted: bool) -> list[str]:
    """Inputs from the training data itself, or longer strings of another alphabet."""
    rng = random.Random(seed)
    if shifted:
        alphabet = string.ascii_uppercase + string.digits + " ,.;:!?-"
        return ["".join(rng.choices(alphabet, k=rng.randint(16, 20))) for _ in range(n)]
    rows = [json.loads(line)["input"] for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    return rng.sample(rows, n)


def exchange(t: float, release: str, prompt: str) -> Exchange:
    body = json.dumps({"model": release.split("-")[0], "prompt": prompt, "max_tokens": 4}).encode()
    answer = json.dumps({"id": f"cmpl-{random.random()}", "choices": [{"text": prompt[::-1], "finish_reason": "stop"}]})
    return Exchange(t, 0.01, "completions", 200, release, [body], [answer.encode()])


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two deployed models' captured traffic through one writer (the Modal gateway's case): a's
    as the example's, b's shifted. A few records of b from before records named their model."""
    import time

    root = two_models(tmp_path_factory.mktemp("ops") / "p")
    store = LocalStore(root / ".mlops")
    art = root.parent / "art"
    art.mkdir()
    (art / "config.json").write_text("{}")
    for rid in (A, B):
        Registry(store).publish(rid, art, {"model": rid[0]})
    w = CaptureWriter(store, models={"a": "{input}=", "b": "{input}="}, source="gateway", flush_interval=0.2)
    now = time.time() - 60
    for i, (x, y) in enumerate(zip(inputs(root, N, 1, False), inputs(root, N, 2, True), strict=True)):
        w.submit(exchange(now + i * 0.01, A, f"{x}="))
        w.submit(exchange(now + i * 0.01, B, f"{y}="))
    w.close()
    old = CaptureWriter(store, source="local", flush_interval=0.2)  # no models: records without `model`
    for i, y in enumerate(inputs(root, 5, 3, True)):
        old.submit(exchange(now + 1 + i * 0.01, B, f"{y}="))
    old.close()
    return root


def monitor(root: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = mlops("monitor", "--json", "--since", "1h", *OFF, *args, cwd=root, timeout=300)
    assert r.returncode in (0, 3), r.stderr[-2000:]
    return r.returncode, json.loads(r.stdout), r.stderr


def test_capture_names_the_model_and_monitor_model_reads_only_its_traffic(traffic: Path) -> None:
    files = sorted((traffic / ".mlops" / "monitor" / "capture").rglob("*.jsonl"))
    recs = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert {(r["release"], r.get("model")) for r in recs} == {(A, "a"), (B, "b"), (B, None)}
    rc, rep, _ = monitor(traffic, "--model", "a")
    assert (rc, rep["verdict"], rep["requests"], rep["drifted"]) == (0, "ok", N, [])
    rc, rep, err = monitor(traffic, "--model", "b")
    assert (rc, rep["verdict"], rep["requests"]) == (3, "drift", N + 5)  # the old records by their release id
    assert "prompt_length_psi" in rep["drifted"] and "drift: prompt_length_psi" in err
    rc, rep, _ = monitor(traffic, "--release", A)  # a release id names its model
    assert (rc, rep["requests"]) == (0, N)


def test_monitor_without_model_reports_each_model_and_exits_with_the_worst(traffic: Path, tmp_path: Path) -> None:
    md = tmp_path / "drift.md"
    rc, rep, err = monitor(traffic, "--markdown-out", str(md))
    assert rc == 3 and sorted(rep["models"]) == ["a", "b"]
    assert rep["models"]["a"]["verdict"] == "ok" and rep["models"]["b"]["verdict"] == "drift"
    # the top level keeps a one-model report's keys (the nightly workflow reads them)
    assert rep["verdict"] == "drift" and rep["requests"] == 2 * N + 5
    assert "b.prompt_length_psi" in rep["drifted"] and not any(d.startswith("a.") for d in rep["drifted"])
    assert {c["name"] for c in rep["checks"]} >= {"a.char_js", "b.char_js"}
    assert "drift: b: prompt_length_psi" in err
    text = md.read_text()
    assert text.startswith("<!-- mlops-monitor-report -->") and text.count("<!-- mlops-monitor-report -->") == 1
    assert "**Model `a`**" in text and "**Model `b`**" in text
    # the nightly's retrain request from this report names `b` alone: CT retrains `b` only
    request = retrain.cut(rep)
    assert retrain.drifted_models(request) == ["b"] and request["models"]["a"]["drifted"] == []
    assert retrain.flags(request, load(traffic / "mlops.yaml").cfg.deploy.names) == (["--force-model", "b"], [])


# --------------------------------------------------------------------------- doctor


def _promoted(reg: Registry, art: Path, model: str, n: int) -> list[str]:
    """`n` releases of `model`, each promoted in turn (its history says so, as rollout.promote writes)."""
    out = []
    for _ in range(n):
        rid = reg.new_id(model)
        reg.publish(rid, art, {"model": model})
        prev = out[-1] if out else None

        def change(st: Any, rid: str = rid, prev: str | None = prev) -> Any:
            st.stages["production"], st.stages["previous"], st.routing = rid, prev, {rid: 100}
            return st

        reg.scoped(model).update_state(change, "promoted")
        reg.append_event(rid, "promoted")
        out.append(rid)
    return out


@pytest.mark.parametrize("damage", ["one model's production manifest gone", "state.json truncated"])
def test_doctor_repairs_each_models_state_alone(tmp_path: Path, damage: str) -> None:
    from mlops.registry.releases import STATE_KEY

    root = two_models(tmp_path / "p")
    store = LocalStore(root / ".mlops")
    reg = Registry(store)
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text("{}")
    a1, a2 = _promoted(reg, art, "a", 2)
    (b1,) = _promoted(reg, art, "b", 1)
    path = root / ".mlops" / STATE_KEY
    before = json.loads(path.read_text())
    if damage == "state.json truncated":
        path.write_text(path.read_text()[:40])
    else:
        (root / ".mlops" / "releases" / a2 / "manifest.json").unlink()
    dry = mlops("doctor", "--json", cwd=root)
    assert dry.returncode == 4, dry.stderr[-2000:]
    kinds = {(f["kind"], f["model"]) for f in json.loads(dry.stdout)["findings"]}
    assert kinds >= ({("damaged_state", None)} if "truncated" in damage else {("missing_release", "a")})
    fixed = mlops("doctor", "--repair", "--json", cwd=root)
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["ok"], fixed.stdout + fixed.stderr[-2000:]
    after = json.loads(path.read_text())["models"]
    want_a = a2 if "truncated" in damage else a1  # rebuilt from a's histories, or back to a's previous
    assert (after["a"]["stages"]["production"], after["a"]["routing"]) == (want_a, {want_a: 100})
    assert after["b"]["stages"]["production"] == b1 and after["b"]["routing"] == {b1: 100}
    if "truncated" not in damage:
        assert after["b"] == before["models"]["b"]  # the neighbour untouched, version and all
    assert mlops("doctor", "--json", cwd=root).returncode == 0
    rel = mlops("releases", "--json", "--model", "b", cwd=root)
    assert rel.returncode == 0 and json.loads(rel.stdout)["production"] == b1
