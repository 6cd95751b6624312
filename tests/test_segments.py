"""Gates on slices: `segment: <tag>` gates only the cases carrying that tag.

Two releases are evaluated by the real harness against a real endpoint on 127.0.0.1 that answers
the example task (reverse the input) right, except that the candidate gets every billing question
wrong. The overall mean barely moves, so the overall gates pass; the billing gate fails, and the
report shows the slice that moved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import InThreadServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlops.config import load
from mlops.errors import ConfigError
from mlops.evals.gates import check_gates
from mlops.evals.harness import run_suite
from mlops.pipeline import Session
from mlops.report import build_report, to_markdown

try:
    from test_judges import JudgeServer, judge_server  # noqa: F401
    from test_report import publish
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_judges import JudgeServer, judge_server  # noqa: F401
    from tests.test_report import publish

REPO = Path(__file__).resolve().parent.parent
PROD = "tiny-20250101-000000-aaaaaa"
CAND = "tiny-20250102-000000-bbbbbb"
N, BILLING = 80, 10  # 10 of 80 cases are billing questions: losing all of them costs the mean 0.125


class Endpoint(InThreadServer):
    """Reverses the prompt; the candidate release answers billing prompts with garbage."""

    def __init__(self) -> None:
        super().__init__(Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"])]))

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        release = request.headers.get("x-mlops-release") or ""
        prompt = str(body["prompt"]).removesuffix("=")
        text = "no idea" if release == CAND and prompt.startswith("bill") else prompt[::-1]
        return JSONResponse({"choices": [{"index": 0, "text": text}]}, headers={"x-mlops-release": release})


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    yield from Endpoint().running()


def project(root: Path, gates: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "mlops.yaml").read_text())
    cfg["tracking"] = {"wandb": {"mode": "disabled"}}
    cfg["datasets"] = {"train": {"path": "train.jsonl"}, "heldout": {"path": "heldout.jsonl"}}
    cfg["evals"] = {"heldout": {"dataset": "heldout", "metrics": ["exact_match"], "concurrency": 8, "timeout": 10}}
    cfg["gates"] = gates
    (root / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (root / "train.jsonl").write_text('{"input": "ab", "expected": "ba"}\n')
    if rows is None:
        rows = []
        for i in range(N):
            word = f"bill{i:03d}" if i < BILLING else f"ship{i:03d}"
            tags = ["billing"] if i < BILLING else ["shipping", "easy"] if i % 2 else ["shipping"]
            rows.append({"id": f"c{i:03d}", "input": word, "expected": word[::-1], "tags": tags})
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "mlops.yaml"


OVERALL = [
    {"eval": "heldout", "metric": "exact_match", "min": 0.8},
    {"eval": "heldout", "metric": "exact_match", "max_regression": 0.2},
]
SEGMENT = {"eval": "heldout", "metric": "exact_match", "segment": "billing", "min": 0.8, "max_regression": 0.2}


def test_a_candidate_that_breaks_only_the_tagged_slice_fails_its_segment_gate(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    loaded = load(project(tmp_path / "p", [*OVERALL, SEGMENT]))
    s = Session.open(loaded)
    cache = tmp_path / "cache"
    for rid in (PROD, CAND):
        res = run_suite(loaded, "heldout", rid, endpoint.url, cache)
        publish(s, rid, res, tmp_path, production=rid == PROD)
    cand = s.registry.get_eval(CAND, "heldout")
    assert cand is not None and cand.metrics["exact_match"].mean == pytest.approx(1 - BILLING / N)
    assert {c.id: c.tags for c in cand.cases}["c000"] == ["billing"]

    rep = build_report(s.registry, loaded.cfg, CAND)
    by = {(g.name, g.kind): g for g in rep.gates}
    overall_min = by["heldout.exact_match mean", "absolute"]
    overall_reg = by["heldout.exact_match mean", "regression"]
    assert overall_min.passed and overall_reg.passed, (overall_min, overall_reg)
    assert overall_reg.n == N and overall_reg.segment is None
    seg_min = by["heldout.exact_match[billing] mean", "absolute"]
    seg_reg = by["heldout.exact_match[billing] mean", "regression"]
    assert not seg_min.passed and seg_min.candidate == 0.0 and seg_min.n == BILLING
    assert not seg_reg.passed and seg_reg.segment == "billing" and seg_reg.n == BILLING
    assert (seg_reg.production, seg_reg.delta) == (1.0, -1.0)
    assert "10 paired cases tagged 'billing'" in seg_reg.reason
    assert rep.verdict == "fail"

    # the overall rows are unchanged by the slices; the per-segment rows are metric x segment
    assert [(r.metric, r.verdict) for r in rep.metrics] == [("exact_match", "pass")]
    seg = {r.segment: r for r in rep.segments}
    assert list(seg) == ["billing", "easy", "shipping"]
    assert (seg["billing"].candidate, seg["billing"].production, seg["billing"].verdict) == (0.0, 1.0, "fail")
    assert seg["billing"].paired_cases == BILLING and seg["billing"].n == BILLING
    assert (seg["shipping"].candidate, seg["shipping"].delta, seg["shipping"].verdict) == (1.0, 0.0, None)
    assert seg["easy"].n == (N - BILLING) // 2
    md = to_markdown(rep)
    assert "### Per segment" in md and "| billing | heldout.exact_match (10 cases) | 1 | 0 | -1 ↓" in md
    assert rep.model_dump(mode="json")["segments"][0]["segment"] == "billing"
    # the trend charts the overall gates only
    assert [t.label for t in rep.trend] == ["heldout.exact_match mean"]


def test_an_unknown_segment_is_a_config_error_at_validate(tmp_path: Path) -> None:
    path = project(tmp_path / "p", [{**SEGMENT, "segment": "biling"}])
    with pytest.raises(ConfigError, match=r"gates\.0\.segment: no case of eval 'heldout' has tag 'biling'") as e:
        load(path)
    assert "did you mean 'billing'?" in str(e.value) and str(e.value).count("\n") == 0
    untagged = [{"id": "c0", "input": "ab", "expected": "ba"}]
    path = project(tmp_path / "q", [SEGMENT], untagged)
    with pytest.raises(ConfigError, match="no case of the suite has tags"):
        load(path)
    assert load(project(tmp_path / "r", [SEGMENT])).cfg.gates[0].segment == "billing"


def test_an_unknown_segment_is_a_config_error_at_eval_when_validate_cannot_read_the_data(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    path = project(tmp_path / "p", [{**SEGMENT, "segment": "refunds"}])
    loaded = load(path, check_files=False)  # as the commands that do not read data load it
    with pytest.raises(ConfigError, match=r"gates\[0\]\.segment: no case of eval 'heldout' has tag 'refunds'"):
        run_suite(loaded, "heldout", PROD, endpoint.url, None)


def test_a_rag_suite_is_judged_through_the_harness_with_the_suites_judge(
    endpoint: Endpoint, judge_server: JudgeServer, tmp_path: Path
) -> None:
    """Rows with retrieved contexts and tags, read by the harness, scored by ragas' faithfulness through
    the suite's default judge: an answer its context supports scores 1, one it does not scores 0."""
    rows = [
        {
            "id": f"q{i}",
            "input": f"word{i:03d}",
            "expected": f"{i:03d}drow",
            "retrieval_context": [f"{i:03d}drow" if i % 2 else "The office is closed on Sundays."],
            "tags": ["supported" if i % 2 else "unsupported"],
        }
        for i in range(6)
    ]
    path = project(
        tmp_path / "p", [{"eval": "heldout", "metric": "ragas.faithfulness", "segment": "supported", "min": 1}], rows
    )
    cfg = yaml.safe_load(path.read_text())
    cfg["judges"] = {"local": {"base_url": judge_server.base_url, "model": "judge-1", "timeout_s": 10}}
    cfg["evals"]["heldout"] |= {"judge": "local", "metrics": ["ragas.faithfulness"]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    loaded = load(path)
    res = run_suite(loaded, "heldout", PROD, endpoint.url, tmp_path / "cache")
    by_id = {c.id: c for c in res.cases}
    assert [by_id[f"q{i}"].scores["ragas.faithfulness"] for i in range(6)] == [0.0, 1.0] * 3, res.cases
    assert res.cost.judge_calls > 0 and res.metrics["ragas.faithfulness"].failed == 0
    (g,) = check_gates(loaded.cfg.gates, {"heldout": res}, {"heldout": None})
    assert g.passed and g.n == 3 and g.segment == "supported"
