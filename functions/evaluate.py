"""Scoring on Modal: one call scores one shard of cases; the client fans shards out with `.map()`.

    modal deploy functions/evaluate.py

Generation stays where the endpoint is (the harness queries the gateway); what fans out is the
scoring, where the heavy metrics are (embedding models, ragas, deepeval). Judge-based metrics call
a remote judge anyway and are scored by the client, so a shard names no judges.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import modal
from images import eval_image, extra_secrets, settings

app = modal.App(settings.eval_app)

PROJECT_ROOT = "/root/project"  # where images.py puts the repository's evals/ directory


def score_shard(shard: dict[str, Any], base_dir: str | Path = PROJECT_ROOT) -> dict[str, Any]:
    """Score `shard = {"metrics": [spec, ...], "cases": [case, ...], "outputs": [output, ...]}`.

    Cases and outputs are the dict forms of `mlops.evals.types.Case` / `Output`. Returns
    `{"scores": {metric: [{"value", "reason", "failed"}, ...]}, "higher_is_better": {metric: bool}}`,
    one score per case, in order. Plain Python: tests call it without Modal.
    """
    from mlops.evals.metrics import build_metric
    from mlops.evals.types import Case, Output

    cases = [Case(**(c | {"context": tuple(c.get("context") or ())})) for c in shard["cases"]]
    outputs = [Output(**o) for o in shard["outputs"]]
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs")
    scores: dict[str, list[dict[str, Any]]] = {}
    better: dict[str, bool] = {}
    for spec in shard["metrics"]:
        metric = build_metric(spec, Path(base_dir))
        rows = []
        for s in metric.score_batch(cases, outputs):
            value = float(s.value) if math.isfinite(s.value) else 0.0
            rows.append({"value": value, "reason": s.reason, "failed": bool(s.failed)})
        scores[metric.name] = rows
        better[metric.name] = bool(metric.higher_is_better)
    return {"scores": scores, "higher_is_better": better}


@app.function(image=eval_image, secrets=extra_secrets(), env=settings.env(), timeout=settings.eval_timeout)
def evaluate(shard: dict[str, Any]) -> dict[str, Any]:
    return score_shard(shard)
