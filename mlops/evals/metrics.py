"""Metric registry: builtin metrics here; `deepeval.*` and `ragas.*` resolve lazily.

A metric is named in mlops.yaml either as a string (`exact_match`) or as a mapping with
parameters (`{name: regex, pattern: "^[a-z]+$"}`). User metrics name a callable:
`{name: my_metric, callable: "evals/metrics.py:my_metric"}`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlops import plugins
from mlops.errors import ConfigError
from mlops.evals.types import Case, Metric, Output, Score
from mlops.plugins import METRIC_NAMES

MetricFactory = Callable[[dict[str, Any]], Metric]
BUILTIN: dict[str, MetricFactory] = {}

# The other families' names live in the plugin table (so `validate` needs no deepeval/ragas);
# re-exported here for the tests that keep each family's list in step.
DEEPEVAL_NAMES = METRIC_NAMES["deepeval"]
RAGAS_NAMES = METRIC_NAMES["ragas"]


def known_metric_names() -> list[str]:
    return plugins.known_metric_names()


def register(name: str) -> Callable[[MetricFactory], MetricFactory]:
    def deco(factory: MetricFactory) -> MetricFactory:
        BUILTIN[name] = factory
        return factory

    return deco


class _PerCase:
    """Base for metrics that score one case at a time."""

    name = ""
    higher_is_better = True

    def score(self, case: Case, output: Output) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        worst = 0.0 if self.higher_is_better else math.inf
        out = []
        for case, o in zip(cases, outputs, strict=True):
            if o.error is not None:
                out.append(Score(worst if math.isfinite(worst) else 1e9, o.error, failed=True))
            else:
                out.append(Score(float(self.score(case, o))))
        return out


class _Plain(_PerCase):
    """Base for per-case metrics that take no parameters."""

    def __init__(self, params: dict[str, Any]) -> None:
        pass


def _norm(s: str | None) -> str:
    return (s or "").strip()


@register("exact_match")
class ExactMatch(_PerCase):
    name = "exact_match"

    def __init__(self, params: dict[str, Any]) -> None:
        self.case_sensitive = bool(params.get("case_sensitive", True))

    def score(self, case: Case, output: Output) -> float:
        a, b = _norm(output.text), _norm(case.expected)
        if not self.case_sensitive:
            a, b = a.lower(), b.lower()
        return 1.0 if a == b else 0.0


@register("contains")
class Contains(_PerCase):
    name = "contains"

    def __init__(self, params: dict[str, Any]) -> None:
        self.value = params.get("value")

    def score(self, case: Case, output: Output) -> float:
        needle = self.value if self.value is not None else _norm(case.expected)
        return 1.0 if needle in output.text else 0.0


@register("regex")
class Regex(_PerCase):
    name = "regex"

    def __init__(self, params: dict[str, Any]) -> None:
        pattern = params.get("pattern")
        if not isinstance(pattern, str):
            raise ConfigError("metric 'regex' needs a 'pattern' string")
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"metric 'regex': invalid pattern {pattern!r}: {e}") from e

    def score(self, case: Case, output: Output) -> float:
        return 1.0 if self.pattern.search(output.text) else 0.0


@register("json_valid")
class JsonValid(_Plain):
    name = "json_valid"

    def score(self, case: Case, output: Output) -> float:
        try:
            json.loads(output.text)
        except ValueError:
            return 0.0
        return 1.0


@register("length")
class Length(_Plain):
    name = "length"
    higher_is_better = False

    def score(self, case: Case, output: Output) -> float:
        return float(len(output.text))


@register("latency")
class Latency(_Plain):
    """Seconds from request to the full response, as the harness measured it."""

    name = "latency"
    higher_is_better = False

    def score(self, case: Case, output: Output) -> float:
        return float(output.latency_s)


class CallableMetric(_PerCase):
    """A user's function `fn(case, output) -> float` (or bool) from a file in the repository."""

    def __init__(self, name: str, fn: Callable[[Case, Output], float], higher_is_better: bool) -> None:
        self.name = name
        self.fn = fn
        self.higher_is_better = higher_is_better

    def score(self, case: Case, output: Output) -> float:
        v = float(self.fn(case, output))
        if not math.isfinite(v):
            raise ValueError(f"metric {self.name} returned {v}")
        return v


def load_callable(ref: str, base_dir: Path) -> Callable[..., Any]:
    """`path/to/file.py:function` or `package.module:function`."""
    if ":" not in ref:
        raise ConfigError(f"callable {ref!r} must look like 'evals/metrics.py:function'")
    mod_ref, attr = ref.rsplit(":", 1)
    if mod_ref.endswith(".py"):
        path = (base_dir / mod_ref).resolve()
        if not path.is_file():
            raise ConfigError(f"callable {ref!r}: file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"mlops_user_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_ref)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"callable {ref!r}: {attr!r} is not a function in {mod_ref}")
    return fn


def build_metric(spec: str | dict[str, Any], base_dir: Path, judges: dict[str, Any] | None = None) -> Metric:
    """Turn one entry of `evals.<suite>.metrics` into a Metric object."""
    params: dict[str, Any] = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(params.pop("name"))
    if "callable" in params:
        fn = load_callable(str(params.pop("callable")), base_dir)
        return CallableMetric(name, fn, bool(params.pop("higher_is_better", True)))
    family = plugins.metric_family(name)
    build: Callable[[str, dict[str, Any], dict[str, Any]], Metric] = plugins.load("metric family", family)
    return build(name, params, judges or {})


def build_builtin(name: str, params: dict[str, Any], judges: dict[str, Any]) -> Metric:
    if name not in BUILTIN:
        raise ConfigError(f"unknown metric {name!r}")
    return BUILTIN[name](params)
