"""Heavy scoring fanned out over case batches: what `functions/evaluate.py` runs, and the client's
half that sends it and takes the answers back.

A suite's *heavy* metrics (judge-based and embedding metrics, `HEAVY`) are scored by
`score_payload`, one batch of cases per call; `ModalBackend` maps it over the batches
(`Function.map` on Modal, a process per batch in the twin). Every other metric stays on the
runner (cheap, and a user's `callable:` lives in the user's checkout). The scores come back
per case and per metric, so the harness aggregates them exactly as it aggregates local ones:
the eval result is the same document either way.

Judges in the payload carry their spec; a self-hosted one also carries its app's URL, and the
function presents the Proxy Auth Token and the vLLM key from the `{app}-auth` Secret.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlops.config import metric_name
from mlops.evals.types import Case, Metric, Output, Score
from mlops.plugins import JUDGE_METRICS

# Judge calls and embeddings: what is worth a container. String metrics (exact match, BLEU, chrF)
# cost less than shipping the cases; builtin and `callable:` metrics stay on the runner.
HEAVY = frozenset({*JUDGE_METRICS, "ragas.semantic_similarity"})
CASES_PER_INPUT = 4  # one map input scores this many cases (more when a suite is large)
MAX_INPUTS = 32  # ... and a suite never becomes more inputs than this
HEALTH_POLL_S = 2.0
VLLM_KEY_ENV = "MLOPS_VLLM_API_KEY"  # modal_settings.VLLM_KEY_ENV: the key the judge's vLLM wants
PROXY_ENV = {"Modal-Key": "MLOPS_PROXY_TOKEN_ID", "Modal-Secret": "MLOPS_PROXY_TOKEN_SECRET"}


def heavy(spec: str | dict[str, Any]) -> bool:
    """Scored by the eval function: a judge-based or an embedding metric."""
    if isinstance(spec, dict) and "callable" in spec:
        return False
    return metric_name(spec) in HEAVY


def batches(n: int) -> list[range]:
    """Case index ranges, one per map input."""
    if n == 0:
        return []
    size = max(CASES_PER_INPUT, math.ceil(n / MAX_INPUTS))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def payloads(
    specs: Sequence[str | dict[str, Any]],
    judges: Mapping[str, dict[str, Any]],
    cases: Sequence[Case],
    outputs: Sequence[Output],
) -> list[dict[str, Any]]:
    """The map inputs: every heavy metric of the suite over one batch of cases each."""
    return [
        {
            "metrics": list(specs),
            "judges": dict(judges),
            "cases": [cases[i] for i in r],
            "outputs": [outputs[i] for i in r],
        }
        for r in batches(len(cases))
    ]


def _wait_healthy(url: str, headers: dict[str, str], timeout: float) -> None:
    """A scaled-to-zero judge starts on the first request, and a cold vLLM takes longer than one
    judge call's timeout: wait for its /health first (bounded)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            r = httpx.get(f"{url}/health", headers=headers, timeout=60.0, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the judge app {url} did not become healthy in {timeout:.0f}s ({last})")
        time.sleep(HEALTH_POLL_S)  # polling a server that is starting: nothing to wait on instead


def judge_clients(judges: Mapping[str, dict[str, Any]], environ: Mapping[str, str], startup_s: float) -> dict[str, Any]:
    """JudgeClients for the payload's judges; a self-hosted one points at its app, with the Proxy
    Auth Token and the vLLM key (by name: the value stays in the environment)."""
    from mlops.config import JudgeCfg
    from mlops.evals.judges import JudgeClient

    out: dict[str, Any] = {}
    for name, j in judges.items():
        spec = JudgeCfg.model_validate(j["spec"])
        headers: dict[str, str] = {}
        if spec.self_hosted:
            headers = {h: environ[v] for h, v in PROXY_ENV.items() if environ.get(v)}
            _wait_healthy(str(j["url"]), headers, startup_s)
            spec = spec.model_copy(update={"base_url": f"{j['url']}/v1", "api_key_env": VLLM_KEY_ENV})
        out[name] = JudgeClient(spec, None, name=name, headers=headers)
    return out


def score_payload(
    payload: dict[str, Any], environ: Mapping[str, str] | None = None, startup_s: float = 960.0
) -> dict[str, Any]:
    """Score one batch: {"scores": {metric: [[value, reason, failed], ...]}, "judges": {name: stats}}."""
    # the harness's own per-metric scoring: a metric that raises fails only the cases it cannot score
    from mlops.evals.harness import _score_metric
    from mlops.evals.metrics import build_metric

    env = os.environ if environ is None else environ
    clients = judge_clients(payload["judges"], env, startup_s)
    metrics = [build_metric(spec, Path.cwd(), clients) for spec in payload["metrics"]]
    cases, outputs = list(payload["cases"]), list(payload["outputs"])
    # a repeated judge's samples ride along as a 4th element, only when there are some
    scores = {
        m.name: [
            [s.value, s.reason, s.failed, *([list(s.samples)] if s.samples else [])]
            for s in _score_metric(m, cases, outputs)
        ]
        for m in metrics
    }
    return {"scores": scores, "judges": {n: c.stats() for n, c in clients.items()}}


_COUNTERS = ("calls", "retries", "cache_hits", "failures", "prompt_tokens", "completion_tokens")


class RemoteMetric:
    """A heavy metric as the harness sees it: its scores come from the fan-out, which runs once
    for every heavy metric of the suite on the first metric's `score_batch`."""

    def __init__(self, local: Metric, fanout: Fanout) -> None:
        self.name = local.name
        self.higher_is_better = local.higher_is_better
        self._fanout = fanout

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]:
        return self._fanout.scores(self.name, cases, outputs)


class Fanout:
    """Runs `run_map(payloads)` once per suite and hands each RemoteMetric its scores. Judge
    counters that came back are added to the runner's JudgeClients, so the cost report counts them."""

    def __init__(
        self,
        specs: list[str | dict[str, Any]],
        judges: Mapping[str, dict[str, Any]],
        clients: Mapping[str, Any],
        run_map: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    ) -> None:
        self.specs, self.judges, self.clients, self.run_map = specs, judges, clients, run_map
        self._done: dict[str, list[Score]] | None = None
        self.inputs = 0

    def scores(self, name: str, cases: list[Case], outputs: list[Output]) -> list[Score]:
        if self._done is None:
            inputs = payloads(self.specs, self.judges, cases, outputs)
            self.inputs = len(inputs)
            done: dict[str, list[Score]] = {}
            for result in self.run_map(inputs) if inputs else []:
                for metric, rows in result["scores"].items():
                    done.setdefault(metric, []).extend(
                        Score(float(row[0]), row[1], bool(row[2]), tuple(row[3]) if len(row) > 3 else ())
                        for row in rows
                    )
                for judge, stats in result.get("judges", {}).items():
                    client = self.clients.get(judge)
                    for k in _COUNTERS if client is not None else ():
                        setattr(client, k, getattr(client, k) + int(stats.get(k) or 0))
            self._done = done
        got = self._done.get(name, [])
        if len(got) != len(cases):
            raise RuntimeError(f"the eval function returned {len(got)} scores of {name} for {len(cases)} cases")
        return got


def remote_metrics(
    specs: Sequence[str | dict[str, Any]],
    metrics: list[Metric],
    judges: Mapping[str, dict[str, Any]],
    clients: Mapping[str, Any],
    run_map: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> list[Metric]:
    """`metrics` (built from `specs`, in order) with the heavy ones replaced by RemoteMetrics."""
    heavy_specs = [s for s in specs if heavy(s)]
    if not heavy_specs:
        return metrics
    fan = Fanout(heavy_specs, judges, clients, run_map)
    return [RemoteMetric(m, fan) if heavy(s) else m for s, m in zip(specs, metrics, strict=True)]
