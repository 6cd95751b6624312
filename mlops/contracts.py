"""The results that cross module boundaries, as pydantic models (the bottom layer).

The registry stores their `model_dump()`; the JSON on disk is what the earlier dataclasses' and
dicts' JSON was, so registries written before read back unchanged. Built by keyword only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer


class Contract(BaseModel):
    # defer_build: `mlops validate` and `--help` import this module without paying for the models
    model_config = ConfigDict(extra="forbid", defer_build=True)


class MetricSummary(Contract):
    """One metric over one suite's cases (`evals.stats.aggregate` of the per-case values)."""

    higher_is_better: bool
    n: int
    failed: int  # cases the metric could not score (they count at the metric's worst value)
    mean: float
    p50: float
    p95: float
    p99: float


class CaseRow(Contract):
    """One case of a suite: what was asked, what came back, and each metric's score on it.

    Defaults are what results stored by earlier versions lack (`cached`, `failed`), so they read back."""

    id: str
    input: str
    expected: str | None
    output: str
    latency_s: float
    error: str | None  # set when the endpoint call failed: the case fails every metric
    cached: bool = False
    scores: dict[str, float]
    reasons: dict[str, str]
    failed: list[str] = []  # metrics that could not score this case
    # the case's segments (gates and the report slice by them); left out when empty, so an untagged
    # suite's stored results stay byte-for-byte what earlier versions wrote
    tags: list[str] = Field(default=[], exclude_if=lambda v: not v)
    # a judge metric with `repeat: N`: metric -> the N values behind its score (their spread is the
    # judge's noise on this case); left out when no metric repeats, as `tags`
    samples: dict[str, list[float]] = Field(default={}, exclude_if=lambda v: not v)


class JudgeStats(Contract):
    """One judge's calls during a suite (`evals.judges.JudgeClient.stats`)."""

    judge: str
    model: str
    calls: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EvalCost(Contract):
    """What one suite cost: endpoint calls, judge calls and time (zeros where earlier versions kept none)."""

    endpoint_calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cache_hits: int = 0
    errors: int = 0
    completion_tokens: int = 0
    query_s: float = 0.0
    wall_s: float = 0.0
    judge_calls: int = 0
    judge_cache_hits: int = 0
    judge_retries: int = 0
    judge_failures: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    judges: list[JudgeStats] = []


class EvalResult(Contract):
    """One suite's result for one release: what `run_suite` returns and the registry stores
    (`releases/<id>/evals/<suite>.json`, the `model_dump()`)."""

    suite: str
    release: str
    created_at: str | None = None
    n: int
    metrics: dict[str, MetricSummary]  # metric -> summary, in the suite's order
    metric_names: list[str]
    cases: list[CaseRow]
    cost: EvalCost = Field(default_factory=EvalCost)

    def means(self) -> dict[str, float]:
        return {m: v.mean for m, v in self.metrics.items()}


class GateResult(Contract):
    """One check of one gate, with the numbers and a one-line reason."""

    name: str  # suite.metric stat, e.g. "heldout.latency p95"
    eval: str
    metric: str
    stat: str
    kind: str  # absolute | regression
    candidate: float | None = None  # the statistic over the candidate's cases
    production: float | None = None  # the statistic over production's cases (regression: the paired cases)
    delta: float | None = None  # candidate - production, in the metric's units
    interval: tuple[float, float] | None = None  # bounds of delta; each end is a one-sided `confidence` bound
    threshold: str  # the bound, as the report shows it
    passed: bool
    reason: str
    n: int = 0  # cases behind `candidate` (regression: paired cases)
    higher_is_better: bool = True
    stat_threshold: float | None = None  # pass_rate: the per-case threshold
    segment: str | None = None  # the tag whose cases the check looked at; None: all cases
    # cases kept out of this check (quarantined, or flaky under `exclude_flaky`); left out when none
    excluded: list[str] = Field(default=[], exclude_if=lambda v: not v)


class StepVerdict(Contract):
    """One step of a rollout (shadow or canary): the live numbers of both releases and the decision."""

    step: int
    percent: int
    candidate: dict[str, float]
    production: dict[str, float]
    passed: bool
    reasons: list[str] = []
    decided_by: str = "pipeline:analysis"
    mode: str = "canary"  # canary | shadow | replay | guardrail
    notes: list[str] = []
    extra: dict[str, Any] = {}  # step-specific numbers (shadow agreement), recorded flat beside the rest
    # Live analysis (mlops/rollout_analysis.py): pass | fail | extend (too little traffic yet: judge
    # the step again later) | replay (still too little: judge it on replayed eval prompts). None: an
    # older verdict, `passed` says. `checks`: one entry per check (name, status, numbers, why).
    decision: Literal["pass", "fail", "extend", "replay"] | None = None
    checks: list[dict[str, Any]] = []

    @property
    def outcome(self) -> str:
        return self.decision or ("pass" if self.passed else "fail")

    def to_json(self) -> dict[str, Any]:
        """The `canary_step` event's detail: the fields, `verdict: pass|fail|extend|replay`, and `extra` flattened."""
        # a verdict of the older analysis records what it always did (no decision, no checks)
        live = self.decision is not None or bool(self.checks)
        doc = self.model_dump(exclude={"extra"} if live else {"extra", "decision", "checks"})
        return doc | {"verdict": self.outcome} | self.extra


def _steps_json(steps: list[StepVerdict]) -> list[dict[str, Any]]:
    """A result's canary steps in the JSON the workflows read: each step's `canary_step` event detail."""
    return [v.to_json() for v in steps]


class TrainOutcome(Contract):
    """What `mlops train` did: the new release, or the identical one that exists, and why."""

    release: str | None
    trained: bool
    reason: str
    lineage: dict[str, Any]  # the manifest's lineage (free-form: git, data and config hashes)
    train: dict[str, Any] | None = None  # the run record (training.job.TrainResult), set only when it trained


class ModelPlan(Contract):
    model: str
    fingerprint: str
    lineage: dict[str, Any]
    train: bool
    reason: str
    existing: str | None = None


class Plan(Contract):
    models: list[ModelPlan] = []


class BudgetLine(Contract):
    """One cap of `budget:` against what is spent and what the next run would spend."""

    scope: str  # run | month
    key: str  # train_gpu_hours | train_usd | judge_tokens | judge_usd | eval_gpu_hours | serve_gpu_hours | usd
    cap: float
    spent: float  # this calendar month so far (the registry's cost records); 0 for a per-run cap
    estimate: float | None  # what the next run would add; None where nothing estimates it (serving)
    left: float  # cap - spent
    over: bool  # spent + estimate > cap


class BudgetDoc(Contract):
    """Spend against `budget:`: this month's records, the next run's estimate and how it was made."""

    month: str  # YYYY-MM (UTC)
    spent: dict[str, float]
    estimate: dict[str, float]
    basis: list[str]  # one line per estimated part: where its numbers come from
    lines: list[BudgetLine]
    release: dict[str, float] = {}  # the report's release: what its own records this month add up to


class RunResult(Contract):
    """What `mlops run` did: the status workflows branch on, and the numbers behind it."""

    status: str  # promoted | rejected | rolled_back | unchanged | rolling_out (--no-wait)
    exit_code: int
    release: str | None
    production: str | None
    previous: str | None = None
    trained: bool = False
    message: str = ""
    evals: dict[str, dict[str, MetricSummary]] = {}  # suite -> metric -> summary
    gates: list[GateResult] = []
    canary: list[StepVerdict] = []  # the rollout's steps, dumped as history records them
    endpoint: str | None = None
    served_by: str | None = None
    timings: dict[str, float] = {}
    wandb_run: str | None = None
    mlflow_run: str | None = None
    warnings: list[str] = []  # what went wrong beside the run and did not fail it (MLflow down)

    @field_serializer("canary")
    def _canary(self, steps: list[StepVerdict]) -> list[dict[str, Any]]:
        return _steps_json(steps)


class EvalOutcome(Contract):
    """What `mlops eval` did: the release's metrics, and the gates against production."""

    release: str
    production: str | None
    passed: bool
    metrics: dict[str, dict[str, MetricSummary]]  # suite -> metric -> summary
    gates: list[GateResult]
    cost: dict[str, EvalCost]  # suite -> calls, tokens, seconds

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 3


class DeployOutcome(Contract):
    """What `mlops deploy` did. Only the fields that belong to the status are set (and printed)."""

    release: str
    status: str  # promoted | rejected | rolled_back | already production | rolling_out (--no-wait)
    previous: str | None = None
    gates: list[GateResult] | None = None
    canary: list[StepVerdict] | None = None  # dumped as history records them
    message: str = ""

    @field_serializer("canary")
    def _canary(self, steps: list[StepVerdict] | None) -> list[dict[str, Any]] | None:
        return None if steps is None else _steps_json(steps)

    @property
    def exit_code(self) -> int:
        return 3 if self.status in ("rejected", "rolled_back") else 0


class RollbackOutcome(Contract):
    production: str
    previous: str | None
    rolled_back_from: str | None
    state_version: int
