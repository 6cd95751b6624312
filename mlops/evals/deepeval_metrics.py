"""deepeval metrics behind the Metric protocol: `deepeval.<name>` in mlops.yaml.

Each name builds deepeval's own metric object and calls it per case with
`metric.measure(LLMTestCase(...))` (or `a_measure` for judge-based metrics), never
`deepeval.evaluate()`, which costs ~20 ms a case in bookkeeping and writes test-run files.

- `deepeval.exact_match`: `deepeval.metrics.ExactMatchMetric`; no params.
- `deepeval.pattern_match`: `deepeval.metrics.PatternMatchMetric`; `pattern` (must match the
  whole stripped output), `ignore_case`.
- `deepeval.geval`: `deepeval.metrics.GEval`; `criteria` (or `evaluation_steps`),
  `evaluation_params` (subset of input, actual_output, expected_output, retrieval_context;
  default the first three), `judge`, `rubric_name`.
- `deepeval.answer_relevancy`: `deepeval.metrics.AnswerRelevancyMetric`; `judge`.
- `deepeval.faithfulness`: `FaithfulnessMetric`: are the output's claims supported by the case's
  `context` (its retrieved contexts)? `judge`, `truths_limit`.
- `deepeval.hallucination`: `HallucinationMetric`: the share of the case's contexts the output
  agrees with (it contradicts none: 1); `judge`.
- `deepeval.contextual_relevancy`: `ContextualRelevancyMetric`: how much of the retrieved context
  is relevant to the input (scores the retrieval, not the answer); `judge`.
- `deepeval.toxicity`, `deepeval.bias`: `ToxicityMetric`, `BiasMetric`: the share of the output's
  opinions the judge finds free of toxicity / bias (no opinions: 1); `judge`.

All are higher-is-better: deepeval 4 scores hallucination, toxicity and bias as the share of
verdicts that pass (earlier deepeval scored the share that failed).

A chat case's input is its conversation (`Case.prompt_text()`: every turn before the answer as
`role: content` lines). These metrics are single-turn `LLMTestCase` metrics in deepeval, so the
rendered turns are their `input`; no ConversationalTestCase is needed.

Judge-based metrics (every one but `exact_match` and `pattern_match`) talk to a judge from `judges:` through
`JudgeModel`, a `DeepEvalBaseLLM` backed by `JudgeClient` (timeouts, retries, a concurrency
limit, a disk cache). They never fall back to deepeval's default OpenAI model. Cases are scored
concurrently (`asyncio.gather`; the judge's `concurrency` bounds requests in flight), each on a
fresh metric object since deepeval metrics keep per-measure state on `self`.

A case whose output has `error` set, whose judge call fails (timeout, HTTP error, unparseable
answer), or that lacks a field the metric needs (e.g. no `expected`, no `context`) gets the metric's
worst value, 0, with `failed=True` and the reason; other cases are unaffected. Values are finite and in [0, 1].

`repeat: N` on the judge: every case is measured N times (each repetition is its own judge call
and its own cache entry) and the case's value is the median of the N scores; if any repetition
fails the case fails, so a flaky judge can never pass a case silently.
"""

from __future__ import annotations

from mlops.env import set_offline

set_offline()

import asyncio  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from deepeval.metrics import (  # noqa: E402
    AnswerRelevancyMetric,
    BaseMetric,
    BiasMetric,
    ContextualRelevancyMetric,
    ExactMatchMetric,
    FaithfulnessMetric,
    GEval,
    HallucinationMetric,
    PatternMatchMetric,
    ToxicityMetric,
)
from deepeval.models import DeepEvalBaseLLM  # noqa: E402
from deepeval.test_case import LLMTestCase, SingleTurnParams  # noqa: E402

from mlops.errors import ConfigError  # noqa: E402
from mlops.evals.judges import (  # noqa: E402
    JudgeClient,
    JudgeError,
    client_for,
    json_object,
    judge_sample,
    run_sync,
)
from mlops.evals.types import Case, Output, Score  # noqa: E402
from mlops.plugins import METRIC_NAMES  # noqa: E402

NAMES = METRIC_NAMES["deepeval"]  # listed once, in the plugin table (validate checks names without us)

_EVAL_PARAMS = {
    "input": SingleTurnParams.INPUT,
    "actual_output": SingleTurnParams.ACTUAL_OUTPUT,
    "expected_output": SingleTurnParams.EXPECTED_OUTPUT,
    "retrieval_context": SingleTurnParams.RETRIEVAL_CONTEXT,
}


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # deepeval's multimodal prompts: text parts only
        return "\n".join(p if isinstance(p, str) else str(p) for p in prompt)
    return str(prompt)


def _coerce(text: str, schema: Any) -> Any:
    """A schema instance when the judge's JSON fits `schema`, else the raw text.

    deepeval accepts either: on raw text it runs its own lenient JSON path (which, for instance,
    normalises a verdict of "Yes." to "yes"), and raises if that fails too.
    """
    if schema is None:
        return text
    try:
        return schema.model_validate(json_object(text))
    except Exception:
        return text


class JudgeModel(DeepEvalBaseLLM):
    """deepeval's custom-model interface over a JudgeClient (OpenAI-compatible chat endpoint)."""

    def __init__(self, client: JudgeClient) -> None:
        self.client = client
        super().__init__(client.spec.model)

    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        return self.client

    def get_model_name(self, *args: Any, **kwargs: Any) -> str:
        return f"mlops judge {self.client.name} ({self.client.spec.model})"

    def generate(self, prompt: Any, schema: Any = None, **kwargs: Any) -> Any:
        text = self.client.complete_sync([{"role": "user", "content": _prompt_text(prompt)}])
        return _coerce(text, schema)

    async def a_generate(self, prompt: Any, schema: Any = None, **kwargs: Any) -> Any:
        text = await self.client.complete([{"role": "user", "content": _prompt_text(prompt)}])
        return _coerce(text, schema)


def _failure_reason(e: BaseException) -> str:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, JudgeError):
            return f"judge: {cur.reason}"
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _test_case(case: Case, output: Output) -> LLMTestCase:
    contexts = list(case.context) or None
    return LLMTestCase(
        input=case.prompt_text(),
        actual_output=output.text,
        expected_output=case.expected,
        retrieval_context=contexts,
        context=contexts,  # HallucinationMetric reads `context`: the same retrieved passages
    )


def _finite01(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return min(1.0, max(0.0, v))


class DeepEvalMetric:
    """One deepeval metric, scored case by case. `make()` builds a fresh deepeval metric object."""

    higher_is_better = True

    def __init__(self, name: str, make: Callable[[], BaseMetric], judge: JudgeClient | None = None) -> None:
        self.name = name
        self.make = make
        self.judge = judge
        self.repeat = judge.spec.repeat if judge is not None else 1
        self._metric = make() if judge is None else None  # stateless rule metrics: one object reused

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        if len(cases) != len(outputs):
            raise ValueError(f"{self.name}: {len(cases)} cases but {len(outputs)} outputs")
        if self.judge is None:
            return [self._score_rule(c, o) for c, o in zip(cases, outputs, strict=True)]
        return run_sync(lambda: self.ascore_batch(cases, outputs))

    def _score_rule(self, case: Case, output: Output) -> Score:
        if output.error is not None:
            return Score(0.0, output.error, failed=True)
        metric = self._metric
        assert metric is not None
        try:
            metric.measure(_test_case(case, output), _show_indicator=False)
        except Exception as e:
            return Score(0.0, _failure_reason(e), failed=True)
        value = _finite01(metric.score)
        if value is None:
            return Score(0.0, f"{self.name} returned {metric.score!r}", failed=True)
        return Score(value, metric.reason)

    async def ascore_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        """Score every case concurrently; the judge client bounds the requests in flight."""
        try:
            return list(await asyncio.gather(*(self._ascore_case(c, o) for c, o in zip(cases, outputs, strict=True))))
        finally:
            if self.judge is not None:
                await self.judge.aclose()

    async def _ascore_case(self, case: Case, output: Output) -> Score:
        if output.error is not None:
            return Score(0.0, output.error, failed=True)
        try:
            tc = _test_case(case, output)
        except Exception as e:
            return Score(0.0, _failure_reason(e), failed=True)
        runs = await asyncio.gather(*(self._measure_once(tc, r) for r in range(self.repeat)))
        failed = [r for r in runs if isinstance(r, str)]
        if failed:
            note = f" (repeat {runs.index(failed[0]) + 1}/{self.repeat})" if self.repeat > 1 else ""
            return Score(0.0, failed[0] + note, failed=True)
        done = [r for r in runs if not isinstance(r, str)]
        values = [v for v, _ in done]
        med = float(statistics.median(values))
        reason = min(done, key=lambda r: abs(r[0] - med))[1]
        if self.repeat > 1:
            reason = f"median of {self.repeat}: {', '.join(f'{v:.3g}' for v in values)}; {reason or ''}".rstrip("; ")
        return Score(med, reason, samples=tuple(values) if self.repeat > 1 else ())

    async def _measure_once(self, tc: LLMTestCase, sample: int) -> tuple[float, str | None] | str:
        """(value, reason), or a failure reason. Runs as its own task, so the sample index stays local."""
        judge_sample.set(sample)
        metric = self.make()
        try:
            await metric.a_measure(tc, _show_indicator=False)
        except Exception as e:
            return _failure_reason(e)
        value = _finite01(metric.score)
        if value is None:
            return f"{self.name} returned {metric.score!r}"
        return value, metric.reason


_ALLOWED = {
    "deepeval.exact_match": {"cache_dir"},
    "deepeval.pattern_match": {"pattern", "ignore_case"},
    "deepeval.geval": {
        "criteria",
        "evaluation_steps",
        "evaluation_params",
        "judge",
        "rubric_name",
        "cache_dir",
    },
    "deepeval.answer_relevancy": {"judge", "cache_dir"},
    "deepeval.faithfulness": {"judge", "cache_dir", "truths_limit"},
    "deepeval.hallucination": {"judge", "cache_dir"},
    "deepeval.contextual_relevancy": {"judge", "cache_dir"},
    "deepeval.toxicity": {"judge", "cache_dir"},
    "deepeval.bias": {"judge", "cache_dir"},
}
# judge-based metrics built the same way, from their deepeval class
_JUDGED: dict[str, Any] = {
    "deepeval.answer_relevancy": AnswerRelevancyMetric,
    "deepeval.faithfulness": FaithfulnessMetric,
    "deepeval.hallucination": HallucinationMetric,
    "deepeval.contextual_relevancy": ContextualRelevancyMetric,
    "deepeval.toxicity": ToxicityMetric,
    "deepeval.bias": BiasMetric,
}


def build(name: str, params: dict[str, Any], judges: dict[str, Any]) -> DeepEvalMetric:
    """Build the metric `name` (one of NAMES) with its `params` from mlops.yaml.

    `judges` maps judge names to JudgeSpec (or ready JudgeClient objects, to share counters and
    cache between metrics); judge-based metrics pick one with the `judge` parameter.
    """
    if name not in _ALLOWED:
        raise ConfigError(f"unknown metric {name!r} (deepeval metrics: {', '.join(NAMES)})")
    extra = set(params) - _ALLOWED[name]
    if extra:
        allowed = ", ".join(sorted(_ALLOWED[name] - {"cache_dir"})) or "none"
        raise ConfigError(f"metric {name!r}: unknown parameter(s) {', '.join(sorted(extra))} (allowed: {allowed})")
    cache_dir = Path(params["cache_dir"]) if params.get("cache_dir") else None

    if name == "deepeval.exact_match":
        return DeepEvalMetric(name, lambda: ExactMatchMetric())
    if name == "deepeval.pattern_match":
        pattern = params.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"metric {name!r} needs a 'pattern' string (a regex the whole output must match)")
        ignore_case = bool(params.get("ignore_case", False))
        try:
            PatternMatchMetric(pattern=pattern, ignore_case=ignore_case)
        except ValueError as e:
            raise ConfigError(f"metric {name!r}: {e}") from e
        return DeepEvalMetric(name, lambda: PatternMatchMetric(pattern=pattern, ignore_case=ignore_case))

    client = client_for(params.get("judge"), judges, name, cache_dir)
    model = JudgeModel(client)
    if name in _JUDGED:
        cls = _JUDGED[name]
        kwargs: dict[str, Any] = {"model": model, "eval_mode": "llm", "include_reason": True}
        if name == "deepeval.faithfulness" and params.get("truths_limit") is not None:
            limit = params["truths_limit"]
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ConfigError(f"metric {name!r}: truths_limit must be a positive integer")
            kwargs["truths_extraction_limit"] = limit
        return DeepEvalMetric(name, lambda: cls(**kwargs), client)

    # deepeval.geval
    criteria = params.get("criteria")
    steps = params.get("evaluation_steps")
    if criteria is None and steps is None:
        raise ConfigError(f"metric {name!r} needs 'criteria' (or 'evaluation_steps')")
    if criteria is not None and (not isinstance(criteria, str) or not criteria.strip()):
        raise ConfigError(f"metric {name!r}: 'criteria' must be a non-empty string")
    if steps is not None and (
        not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps)
    ):
        raise ConfigError(f"metric {name!r}: 'evaluation_steps' must be a non-empty list of strings")
    raw_params = params.get("evaluation_params", ["input", "actual_output", "expected_output"])
    if not isinstance(raw_params, list) or not raw_params:
        raise ConfigError(f"metric {name!r}: 'evaluation_params' must be a non-empty list")
    bad = [p for p in raw_params if p not in _EVAL_PARAMS]
    if bad:
        raise ConfigError(f"metric {name!r}: unknown evaluation_params {bad} (allowed: {', '.join(_EVAL_PARAMS)})")
    eval_params = [_EVAL_PARAMS[p] for p in raw_params]
    label = str(params.get("rubric_name") or "quality")

    def make_geval() -> BaseMetric:
        return GEval(
            name=label,
            criteria=criteria,
            evaluation_steps=steps,
            evaluation_params=eval_params,
            model=model,
        )

    make_geval()  # validate now, at build time, not on the first case
    return DeepEvalMetric(name, make_geval, client)
