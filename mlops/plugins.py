"""Implementations by name: one lazy table (as Metaflow's `plugins/__init__.py`).

Each entry is a "module:attr" string, imported only when that name is used, so `mlops validate`
can check every name without importing torch, boto3, deepeval or ragas. Adding a backend, a
store, an engine or a metric family is one new module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from mlops.errors import ConfigError

BACKENDS: dict[str, str] = {
    "local": "mlops.backends.local:LocalBackend",
    "modal": "mlops.backends.modal:ModalBackend",
}

# Storage by URI scheme: a factory `(uri) -> Store`. A path without a scheme is "file".
STORES: dict[str, str] = {
    "file": "mlops.registry.store:open_local",
    "s3": "mlops.registry.s3:S3Store.from_uri",
}

# Serving engines (`deploy.engine`): a class built from a release's artifact directory.
# Each fits the `Engine` protocol (mlops/serving/base.py) and is built as `cls(model_dir,
# max_batch_size=, max_queue=, threads=)`.
ENGINES: dict[str, str] = {
    "builtin": "mlops.serving.engine:Engine",
    "vllm": "mlops.serving.vllm_engine:VllmEngine",
}

# Metric families: a `build(name, params, judges) -> Metric` each. A metric name `family.x` goes
# to that family; a name without a known family prefix is builtin.
METRIC_FAMILIES: dict[str, str] = {
    "builtin": "mlops.evals.metrics:build_builtin",
    "deepeval": "mlops.evals.deepeval_metrics:build",
    "ragas": "mlops.evals.ragas_metrics:build",
}
# The names each family answers, listed here so `validate` checks a name without importing the
# family (a test keeps each family's own list in step with this one).
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "builtin": ("exact_match", "contains", "regex", "json_valid", "length", "latency"),
    "deepeval": (
        "deepeval.exact_match",
        "deepeval.pattern_match",
        "deepeval.geval",
        "deepeval.answer_relevancy",
        "deepeval.faithfulness",
        "deepeval.hallucination",
        "deepeval.contextual_relevancy",
        "deepeval.toxicity",
        "deepeval.bias",
    ),
    "ragas": (
        "ragas.bleu_score",
        "ragas.rouge_score",
        "ragas.chrf_score",
        "ragas.string_similarity",
        "ragas.string_presence",
        "ragas.semantic_similarity",
        "ragas.faithfulness",
        "ragas.context_precision",
        "ragas.context_recall",
        "ragas.response_relevancy",
    ),
}
# The metrics that ask a judge (`judges:`): a suite's `judge` is their default, and on Modal they are
# scored by the eval function next to a self-hosted judge.
JUDGE_METRICS: tuple[str, ...] = (
    "deepeval.geval",
    "deepeval.answer_relevancy",
    "deepeval.faithfulness",
    "deepeval.hallucination",
    "deepeval.contextual_relevancy",
    "deepeval.toxicity",
    "deepeval.bias",
    "ragas.faithfulness",
    "ragas.context_precision",
    "ragas.context_recall",
    "ragas.response_relevancy",
)

_TABLES: dict[str, dict[str, str]] = {
    "backend": BACKENDS,
    "storage scheme": STORES,
    "engine": ENGINES,
    "metric family": METRIC_FAMILIES,
}


def did_you_mean(name: str, valid: Any) -> str:
    """`(did you mean 'modal'? valid: local, modal)`: the hint every unknown name gets."""
    names = sorted(str(v) for v in valid)
    import difflib  # only on a miss: `validate` of a good config never needs it

    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"({hint}valid: {', '.join(names)})" if names else ""


def check(kind: str, name: str) -> None:
    """Raise ConfigError naming the valid choices when `name` is not in the `kind` table."""
    table = _TABLES[kind]
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r} {did_you_mean(name, table)}")


def load(kind: str, name: str) -> Any:
    """Import and return the implementation registered as `name` in the `kind` table."""
    check(kind, name)
    module, _, attr = _TABLES[kind][name].partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def metric_family(metric: str) -> str:
    """The family a metric name belongs to: its prefix when that is a family, else builtin."""
    prefix = metric.split(".", 1)[0] if "." in metric else ""
    return prefix if prefix in METRIC_FAMILIES and prefix != "builtin" else "builtin"


def known_metric_names() -> list[str]:
    return sorted(n for names in METRIC_NAMES.values() for n in names)
