"""Production traffic into regression cases, for real: requests through `mlops serve` (capture on),
labels through `mlops feedback`, `mlops cases export` in a subprocess, then an eval that scores the
new cases and the report that lists them; and nothing exported from `capture: metadata`."""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import make_project, mlops, train_and_publish

from mlops.testing import mlops_serve

HELDOUT = "daczsbvwcd"  # an input of the shipped evals/heldout.jsonl: never exported again
TO = "evals/from-traffic.jsonl"
UNLABELLED = "zzqqzzq"


@dataclass
class Traffic:
    root: Path
    release: str
    fresh: list[str]  # inputs no suite has (the first was asked twice)
    ids: dict[str, str]  # input -> the response id of its answer
    answers: dict[str, str]  # input -> the answer it got
    repeat: str  # the response id of the repeated question


def _post(c: httpx.Client, url: str, x: str, chat: bool = False) -> dict[str, Any]:
    if chat:
        body = {"model": "tiny", "messages": [{"role": "user", "content": x}], "max_tokens": 8}
        r = c.post(f"{url}/v1/chat/completions", json=body)
    else:
        r = c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"{x}=", "max_tokens": 8})
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Traffic:
    # exact_match and latency only: ragas's import is most of an eval's time here, and not the subject
    root = make_project(
        tmp_path_factory.mktemp("cases"), {"evals": {"heldout": {"metrics": ["exact_match", "latency"]}}}
    )
    rid = train_and_publish(root)
    rng = random.Random(7)
    fresh = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))) for _ in range(5)]
    ids: dict[str, str] = {}
    answers: dict[str, str] = {}
    with mlops_serve(root) as url, httpx.Client(timeout=60) as c:
        for i, x in enumerate([*fresh, HELDOUT, UNLABELLED]):
            doc = _post(c, url, x, chat=i == 2)  # one chat turn: the template comes off it too
            ids[x], ch = doc["id"], doc["choices"][0]
            answers[x] = ch["message"]["content"] if "message" in ch else ch["text"]
        repeat = _post(c, url, fresh[0])["id"]  # asked again, labelled again: still one case
    r = mlops("feedback", ids[fresh[0]], fresh[0][::-1], cwd=root, timeout=120)  # the CLI once
    assert r.returncode == 0, r.stderr
    label(root, ids[fresh[1]], fresh[1][::-1])
    return Traffic(root, rid, fresh, ids, answers, repeat)


def label(root: Path, request_id: str, text: str) -> None:
    from mlops.config import load
    from mlops.monitor.traffic import add_feedback
    from mlops.registry.store import open_store

    add_feedback(open_store(load(root / "mlops.yaml").cfg.storage, base_dir=root), request_id, text)


def export(root: Path, *args: str) -> dict[str, Any]:
    r = mlops("cases", "export", "--since", "1h", "--to", TO, "--labelled", "--json", *args, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def rows(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / TO).read_text().splitlines()]


def _id(x: str) -> str:
    return "traffic-" + hashlib.sha256(x.encode()).hexdigest()[:16]


def test_labelled_traffic_becomes_cases_once_and_an_eval_scores_them(traffic: Traffic) -> None:
    """The nightly loop twice: an export starts the `traffic` suite, production is evaluated on it;
    a later export adds the newly labelled requests, which a candidate's report lists as new."""
    root, fresh = traffic.root, traffic.fresh
    # --failed: the answers exact_match calls wrong against their label; the unlabelled are not judged
    wrong = _export_here(root, root / "failed.jsonl", failed=True, labelled=False, metric="exact_match", dry_run=True)
    assert {ex.input for ex in wrong.new} == {x for x in fresh[:2] if traffic.answers[x].strip() != x[::-1]}
    assert wrong.skipped["no label for exact_match"] == len(fresh) - 2 + 3  # + heldout, unlabelled, repeat
    assert not (root / "failed.jsonl").exists()
    first = export(root)
    assert sorted(r["input"] for r in rows(root)) == sorted(fresh[:2]) and first["exported"] == 2
    cfg = yaml.safe_load((root / "mlops.yaml").read_text())
    cfg["datasets"]["traffic"] = {"path": TO}
    cfg["evals"]["traffic"] = {"dataset": "traffic", "metrics": ["exact_match"]}
    (root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = mlops("eval", "--release", "production", "--no-gates", cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr

    for x in [*fresh[2:], HELDOUT]:
        label(root, traffic.ids[x], x[::-1])
    label(root, traffic.repeat, fresh[0][::-1])
    out = export(root)
    got = rows(root)
    # one case per distinct labelled input; the heldout input and the repeat are left out
    assert sorted(r["input"] for r in got) == sorted(fresh)
    assert out["exported"] == 3 and out["kept"] == 2
    assert out["skipped"] == {"duplicate of an existing case": 4, "no label": 1}  # 2 already here, heldout, repeat
    for row in got:
        assert row["expected"] == row["input"][::-1]  # the label is the expected answer
        assert row["id"] == _id(row["input"])  # stable: a hash of the normalised input
        assert row["tags"] == ["from-traffic"]
        assert row["source"]["release"] == traffic.release
        assert row["source"]["request"] == traffic.ids[row["input"]]
    before = (root / TO).read_bytes()
    assert not _export_here(root, root / TO, labelled=True).new  # run again: nothing new, the file untouched
    assert (root / TO).read_bytes() == before

    # a candidate (production's weights as another release) is scored on the new cases
    cand = _copy_release(root, traffic.release)
    r = mlops("eval", "--release", cand, "--no-gates", cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    r = mlops("report", "--release", cand, "--json", cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["suites"]["traffic"]["n"] == len(fresh)
    new = rep["new_cases"]
    assert new["total"] == 3  # production was scored on the first two and on heldout
    assert {c["id"] for c in new["cases"]} == {_id(x) for x in fresh[2:]}
    assert all(c["metric"] == "exact_match" and c["score"] in (0.0, 1.0) for c in new["cases"])
    from mlops.report import to_markdown
    from mlops.report.model import Report

    assert "### New cases: 3" in to_markdown(Report.model_validate(rep))


def _export_here(root: Path, to: Path, **kw: Any) -> Any:
    """An export in this process (the CLI's own run is covered above)."""
    import time

    from mlops.config import load
    from mlops.monitor.cases import export_cases
    from mlops.registry.releases import Registry
    from mlops.registry.store import open_store

    loaded = load(root / "mlops.yaml")
    reg = Registry(open_store(loaded.cfg.storage, base_dir=root), model="tiny")
    return export_cases(loaded, reg, time.time() - 3600, to, **kw)


def _copy_release(root: Path, rid: str) -> str:
    """Production's weights registered again as a new release: a candidate without a training run."""
    from mlops.config import load
    from mlops.registry.releases import Registry
    from mlops.registry.store import open_store

    loaded = load(root / "mlops.yaml")
    reg = Registry(open_store(loaded.cfg.storage, base_dir=root), model="tiny")
    manifest = {k: v for k, v in reg.require(rid).items() if k not in ("id", "artifact", "created_at")}
    cand = Registry.new_id("tiny")
    reg.publish(cand, reg.artifact_dir(rid), manifest)
    return cand


def test_capture_metadata_is_refused_and_writes_nothing(traffic: Traffic, tmp_path: Path) -> None:
    to = tmp_path / "cases.jsonl"
    r = mlops("cases", "export", "--to", str(to), "--set", "monitor.capture=metadata", cwd=traffic.root, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "monitor.capture is metadata" in lines[0], r.stderr
    assert not to.exists()
