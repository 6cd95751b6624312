"""The eval report, from stored results: verdict first, table, worst cases, trend, cost, size bound.

Most tests publish small releases with stored results straight into a real registry (no training),
so each states the numbers it reports on. The last one trains two tiny models, serves them on a
real local server, and checks that evaluating a candidate never calls production again.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlops.config import load
from mlops.contracts import EvalCost, EvalResult
from mlops.evals.harness import score
from mlops.evals.metrics import ExactMatch, Latency
from mlops.evals.types import Case, Output
from mlops.pipeline import Session, evaluate, gate, production_results
from mlops.registry.releases import State
from mlops.report import MARKER, build_report, to_markdown

try:
    from conftest import make_project, mlops, train_and_publish
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest import make_project, mlops, train_and_publish

REPO = Path(__file__).resolve().parent.parent
GATES = [
    {"eval": "heldout", "metric": "exact_match", "min": 0.5},
    {"eval": "heldout", "metric": "exact_match", "max_regression": 0.05, "confidence": 0.95},
    {"eval": "heldout", "metric": "latency", "stat": "p95", "max": 2.0},
]


def project(root: Path, gates: list[dict[str, Any]] | None = None) -> Session:
    root.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "mlops.yaml").read_text())
    cfg["tracking"] = {"wandb": {"mode": "disabled"}}
    cfg["datasets"] = {"train": {"path": "train.jsonl"}, "heldout": {"path": "heldout.jsonl"}}
    cfg["gates"] = GATES if gates is None else gates
    (root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (root / "train.jsonl").write_text('{"input": "ab", "expected": "ba"}\n')
    (root / "heldout.jsonl").write_text('{"id": "c0", "input": "ab", "expected": "ba"}\n')
    return Session.open(load(root / "mlops.yaml"))


def suite_result(release: str, rows: list[tuple[str, str, str, str, float]]) -> EvalResult:
    """A stored result from (id, input, expected, output, latency) rows, scored by the real metrics."""
    cases = [Case(i, x, e) for i, x, e, _, _ in rows]
    outputs = [Output(o, lat) for _, _, _, o, lat in rows]
    summary, per_case = score([ExactMatch({}), Latency({})], cases, outputs)
    return EvalResult(
        suite="heldout",
        release=release,
        n=len(cases),
        metrics=summary,
        metric_names=list(summary),
        cases=per_case,
        cost=EvalCost(endpoint_calls=len(cases), completion_tokens=3 * len(cases), wall_s=1.5),
    )


def publish(
    s: Session,
    rid: str,
    result: EvalResult,
    tmp: Path,
    production: bool = False,
    device: str = "cpu",
    run: dict[str, Any] | None = None,
) -> None:
    art = tmp / f"art-{rid}"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"not really weights")
    manifest = {
        "model": "tiny",
        "train": {"seconds": 12.5, "device": device, "tokens_per_s": 1000.0} | (run or {}),
        "lineage": {
            "git_sha": "0123456789abcdef",
            "dataset_hashes": {"train": "feedfacecafe"},
            "config_hash": "c0ffee00",
            "code_hash": "deadbeef",
        },
    }
    s.registry.publish(rid, art, manifest)
    s.registry.put_eval(rid, "heldout", result)
    s.registry.append_event(
        rid,
        "evaluated",
        suites=["heldout"],
        summary={"heldout": result.means()},
        stats={"heldout": {m: v.model_dump(include={"mean", "p50", "p95", "p99"}) for m, v in result.metrics.items()}},
    )
    if production:

        def promote(st: State) -> State:
            st.stages["previous"], st.stages["production"] = st.stages.get("production"), rid
            st.routing = {rid: 100}
            return st

        s.registry.update_state(promote, reason="test")


def rows(n: int, right: set[int], seed: int = 0, out_len: int = 0) -> list[tuple[str, str, str, str, float]]:
    rng = random.Random(seed)
    words = [("".join(rng.choice("abcdefgh") for _ in range(6))) for _ in range(n)]
    pad = "x" * out_len
    return [
        (f"rev-{i:05d}", w, w[::-1], w[::-1] if i in right else w[:3] + pad, 0.05 + 0.01 * (i % 7))
        for i, w in enumerate(words)
    ]


RID = "tiny-2025010{}-000000-{:06x}"


@pytest.fixture
def regressed(tmp_path: Path) -> tuple[Session, str, str]:
    """Four releases in a row at 70% exact match, the last in production; a candidate at 55%."""
    s = project(tmp_path / "p")
    good = set(random.Random(1).sample(range(200), 140))
    for k in range(4):
        publish(s, RID.format(k + 1, k), suite_result(RID.format(k + 1, k), rows(200, good)), tmp_path, production=True)
    prod = RID.format(4, 3)
    worse = good - set(sorted(good)[:30])  # 30 cases lost: -15 points
    cand = RID.format(5, 0xABCDEF)
    publish(s, cand, suite_result(cand, rows(200, worse)), tmp_path)
    return s, prod, cand


def test_report_of_a_regressed_candidate(regressed: tuple[Session, str, str]) -> None:
    s, prod, cand = regressed
    rep = build_report(s.registry, s.loaded.cfg, cand)
    md = to_markdown(rep)
    lines = md.splitlines()
    assert lines[0] == MARKER
    assert lines[1] == f"## ❌ Eval report: `{cand}` vs production `{prod}`"
    verdict_at = md.index("**Verdict: FAIL**: 1 of 3 gate checks failed.")
    table_at = md.index("| metric | production | candidate | delta | interval | threshold | verdict |")
    assert verdict_at < table_at  # the verdict comes first
    # every gate with its numbers, failures first
    gate_lines = [ln for ln in lines if ln.startswith(("- ✅", "- ❌"))]
    assert len(gate_lines) == 3
    assert gate_lines[0].startswith("- ❌ `heldout.exact_match mean` regression <= 0.05 @ 95%: worse by 0.15; ")
    assert "- ✅ `heldout.exact_match mean` >= 0.5: mean 0.55 is within min 0.5" in gate_lines
    assert "- ✅ `heldout.latency p95` <= 2: p95 0.11 is within max 2" in gate_lines
    # the table row: production, candidate, delta, interval, thresholds, verdict
    row = next(ln for ln in lines if ln.startswith("| heldout.exact_match |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["0.7", "0.55", "-0.15 ↓"]
    lo, hi = (float(x) for x in re.findall(r"[-+][\d.]+", cells[4]))
    assert lo < -0.15 < hi < -0.05
    assert cells[5] == ">= 0.5; regression <= 0.05 @ 95%" and cells[6] == "❌ fail"
    assert next(ln for ln in lines if ln.startswith("| heldout.latency p95 |")).endswith("| <= 2 | ✅ pass |")
    # worst regressed cases: input, expected, both outputs
    assert "### Worst regressed cases (heldout.exact_match)" in md
    case_rows = [ln for ln in lines if ln.startswith("| rev-")]
    assert len(case_rows) == 8
    first = rep.worst_cases.cases[0]
    assert first.production == first.expected and first.candidate == first.input[:3]
    assert f"| {first.id} | {first.input} | {first.expected} | {first.expected} (1) | {first.input[:3]} (0) |" in md
    # a trend chart per gated statistic, over the releases up to this one
    charts = re.findall(r"```mermaid\n(.*?)```", md, re.S)
    assert len(charts) == 2
    em = next(c for c in charts if "exact_match mean" in c)
    assert em.splitlines()[0] == "xychart-beta"
    assert '    x-axis ["000000", "000001", "000002", "000003 (prod)", "abcdef (this)"]' in em
    assert "    line [0.7, 0.7, 0.7, 0.7, 0.55]" in em and "    line [0.5, 0.5, 0.5, 0.5, 0.5]" in em
    assert re.search(r'    y-axis "exact_match" [\d.]+ --> [\d.]+', em)
    # cost
    assert "**Cost**: training 12.5 s on cpu (0 GPU-s, ≈12,500 tokens); eval 200 endpoint calls" in md
    assert "judges 0 calls" in md
    assert rep.cost.gpu_seconds == 0.0
    json.dumps(rep.model_dump())  # the machine form is plain JSON
    # production's own report compares it with `previous`: the columns say so, not "production"
    own = to_markdown(build_report(s.registry, s.loaded.cfg, prod))
    assert rep.baseline_stage == "production" and "vs previous `" in own.splitlines()[1]
    assert "| metric | previous | candidate | delta |" in own and "| metric | production |" not in own
    assert "delta = candidate − previous" in own


def test_report_of_a_first_release_and_gpu_cost(tmp_path: Path) -> None:
    s = project(tmp_path / "p")
    rid = RID.format(1, 1)
    publish(s, rid, suite_result(rid, rows(50, set(range(40)))), tmp_path, device="cuda:0")
    rep = build_report(s.registry, s.loaded.cfg, rid)
    md = to_markdown(rep)
    assert rep.verdict == "pass" and rep.baseline is None
    assert "vs nothing (no production release yet)" in md.splitlines()[1]
    assert "no production results to compare with (first release)" in md
    assert "### Lowest-scoring cases (heldout.exact_match; no production to compare with)" in md
    assert rep.cost.gpu_seconds == 12.5 and "(12.5 GPU-s" in md
    assert "```mermaid" not in md  # one release: no trend to draw


def test_report_stays_under_the_comment_limit_with_10000_cases(tmp_path: Path) -> None:
    s = project(
        tmp_path / "p",
        gates=GATES
        + [
            {"eval": "heldout", "metric": "latency", "stat": "p99", "max_regression": 0.01},
            {"eval": "heldout", "metric": "exact_match", "stat": "pass_rate", "threshold": 1, "min": 0.9},
        ],
    )
    nasty = "| </details> <script>x</script> ``` @octocat [link](http://x) \n" * 2_000  # ~130 KB
    n = 10_000
    prod_rows = rows(n, set(range(0, n, 2)), out_len=300)
    cand_rows = [
        (i, x, e, (nasty if k % 500 == 0 else o), lat)
        for k, (i, x, e, o, lat) in enumerate(rows(n, set(range(0, n, 3)), out_len=300))
    ]
    prod, cand = RID.format(1, 1), RID.format(2, 2)
    publish(s, prod, suite_result(prod, prod_rows), tmp_path, production=True)
    publish(s, cand, suite_result(cand, cand_rows), tmp_path)
    t0 = time.perf_counter()
    rep = build_report(s.registry, s.loaded.cfg, cand)
    md = to_markdown(rep)
    elapsed = time.perf_counter() - t0
    assert len(md) < 65_000, len(md)
    assert md.startswith(MARKER + "\n") and "**Verdict: FAIL**" in md
    assert md.count("```") % 2 == 0  # no fence left open
    assert "<script>" not in md and "</details>" not in md and "@octocat" not in md
    assert "@\u200bocto" in md  # mentions are defused, not dropped
    assert "### Worst regressed cases" in md and "```mermaid" in md and "**Cost**" in md
    assert len(json.dumps(rep.model_dump())) < 200_000  # the machine form is bounded too
    assert elapsed < 30


def test_report_command_markdown_json_and_step_summary(regressed: tuple[Session, str, str], tmp_path: Path) -> None:
    s, prod, cand = regressed
    summary = tmp_path / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    md = mlops("report", "--release", cand, "--markdown", cwd=s.loaded.root, env=env, timeout=120)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(MARKER + "\n")
    assert max(len(ln) for ln in md.stdout.splitlines()) > 120  # printed as is, not wrapped to a terminal
    js = mlops(
        "report",
        "--release",
        cand,
        "--json",
        "--out",
        str(tmp_path / "r.json"),
        cwd=s.loaded.root,
        env=env,
        timeout=120,
    )
    assert js.returncode == 0, js.stderr
    rep = json.loads(js.stdout)
    assert (rep["verdict"], rep["release"], rep["baseline"]) == ("fail", cand, prod)
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "fail"
    text = summary.read_text()
    assert text.count(MARKER) == 2 and text.startswith(md.stdout)  # appended, once per call


# ---------------------------------------------------------------------------- real servers


def _requests_by_release(url: str, since: float) -> dict[str, int]:
    stats = httpx.get(f"{url}/v1/mlops/stats", params={"since": since}, timeout=10, trust_env=False).json()
    return {rid: int(v["requests"]) for rid, v in stats["releases"].items()}


def test_a_candidate_is_compared_without_calling_production(tmp_path: Path) -> None:
    from mlops.serving.runner import serve_in_thread

    root = make_project(tmp_path / "p", {"evals": {"heldout": {"limit": 40}}})
    prod = train_and_publish(root, seed=0)
    cand = train_and_publish(root, seed=1, steps=20, promote=False)
    s = Session.open(load(root / "mlops.yaml"))
    with serve_in_thread(s.loaded, s.registry) as url:
        # no stored results for production yet: it is evaluated once, through the endpoint
        t0 = time.time()
        _, first = production_results(s, url)
        assert _requests_by_release(url, t0).get(prod) == 40 and first["heldout"] is not None
        # from now on production's results come from the registry
        t1 = time.time()
        results = evaluate(s, cand, url)
        _, stored = production_results(s, url)
        seen = _requests_by_release(url, t1)
    assert seen.get(prod, 0) == 0, seen
    assert seen.get(cand) == 40
    assert stored["heldout"] is not None and stored["heldout"].release == prod
    verdicts = gate(s, cand, results, stored)
    regression = next(g for g in verdicts if g.kind == "regression")
    assert regression.n == 40 and regression.production is not None
    out = mlops("report", "--release", cand, "--markdown", cwd=root, env={"GITHUB_STEP_SUMMARY": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"vs production `{prod}`" in out.stdout
    assert "| heldout.exact_match |" in out.stdout and "(this)" in out.stdout


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert "GITHUB_STEP_SUMMARY" not in os.environ


def test_report_shows_the_run_record_precision_memory_and_dollars(tmp_path: Path) -> None:
    """What a GPU run records (issue 12): precision, peak memory, GPU type and its cost."""
    s = project(tmp_path / "p")
    rid = RID.format(1, 1)
    run = {"precision": "bf16", "gpu_type": "A10G", "gpu_seconds": 3600.0, "peak_memory_mb": 20480.0}
    publish(s, rid, suite_result(rid, rows(50, set(range(40)))), tmp_path, device="cuda", run=run | {"cost_usd": 1.1})
    rep = build_report(s.registry, s.loaded.cfg, rid)
    assert rep.cost.train_cost_usd == 1.1 and rep.cost.gpu_seconds == 3600.0
    assert "(3600.0 GPU-s, ≈12,500 tokens, bf16, peak 20,480 MiB, A10G ≈$1.1000)" in to_markdown(rep)
