"""The report document as pydantic contracts: what `build_report` returns, `to_markdown` renders
and `mlops report --json` prints (`Report.model_dump()`).

The workflows read that JSON, so its shape is frozen: fields are declared in the order the keys
were printed, and numbers read from a release's manifest keep their JSON type (`int | float`, not
`float`, which would turn a stored 3600 into 3600.0). Built by keyword only.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mlops.contracts import BudgetDoc, Contract, GateResult

Number = int | float  # a manifest's number as stored: int first, so pydantic's smart union keeps an int an int


class MetricRow(Contract):
    """One statistic of one metric: production against the candidate, with its gates' verdict."""

    suite: str
    metric: str
    stat: str
    stat_threshold: float | None
    higher_is_better: bool
    production: float | None
    candidate: float
    delta: float | None
    interval: tuple[float, float] | None  # the regression gate's bounds of delta
    paired_cases: int | None
    threshold: str  # every gate's bound on this statistic, "; "-joined
    verdict: str | None  # pass | fail, None when no gate checks it
    failed_cases: int
    n: int


class SegmentRow(MetricRow):
    """A MetricRow over the cases carrying one tag (suites whose cases have tags): metric x segment."""

    segment: str


class WorstCase(Contract):
    """A case that lost most against the baseline (or scored lowest), its text cut for the JSON."""

    suite: str
    metric: str
    id: str
    loss: float
    input: str
    expected: str | None
    candidate: str
    candidate_score: float
    candidate_error: str | None
    production: str | None
    production_score: float | None


class WorstCases(Contract):
    compared: bool  # against a baseline's cases, or (False) the lowest-scoring cases
    cases: list[WorstCase]


class NewCase(Contract):
    """A case the candidate was scored on that the baseline's results of its suite lack: a case
    this change adds (`mlops cases export` writes them from production traffic)."""

    suite: str
    id: str
    input: str
    expected: str | None
    candidate: str
    metric: str | None
    score: float | None
    tags: list[str] = []


class NewCases(Contract):
    total: int  # every new case; `cases` holds the first few
    cases: list[NewCase]


class TrendPoint(Contract):
    release: str
    value: float
    production: bool
    this: bool


class TrendSeries(Contract):
    """One gated statistic over the last releases, oldest first, with the gate's bounds."""

    suite: str
    metric: str
    stat: str
    stat_threshold: float | None
    label: str
    points: list[TrendPoint]
    bounds: list[float]


class ReportCost(Contract):
    """Training (from the manifest's run record, None where an older manifest lacks it) and eval cost."""

    train_seconds: Number | None
    train_device: str | None
    gpu_seconds: Number | None
    train_tokens: int | None
    train_precision: str | None
    gpu_type: str | None
    peak_memory_mb: Number | None
    train_cost_usd: Number | None
    endpoint_calls: int
    cache_hits: int
    retries: int
    errors: int
    completion_tokens: int
    eval_seconds: float
    judge_calls: int
    judge_cache_hits: int
    judge_failures: int
    judge_tokens: int


class GateNoise(Contract):
    """What a no-regression gate can resolve on production's stored cases (mlops.evals.noise.mde)."""

    gate: str
    n: int  # production's cases behind the estimate (quarantined and excluded flaky cases left out)
    mde: float | None  # None: a percentile statistic, or too few cases
    max_regression: float
    confidence: float
    power: float
    warning: str | None  # set when max_regression is below the MDE


class FlakyCase(Contract):
    suite: str
    metric: str
    id: str
    why: str
    quarantined: bool  # listed in evals.<suite>.quarantine
    excluded_by: list[str]  # the gates that leave it out (quarantine, or exclude_flaky)


class CaseSpread(Contract):
    """A judge metric with `repeat`: one case's values over the repeats."""

    suite: str
    metric: str
    id: str
    samples: list[float]
    spread: float


class BaselineAge(Contract):
    suite: str
    release: str
    created_at: str | None
    age_days: float | None
    stale: bool


class Noise(Contract):
    """How much of the verdict is noise: resolution of the regression gates, flaky cases, judge
    spread, and the age of the baseline (mlops.report.noise)."""

    gates: list[GateNoise] = []
    flaky: list[FlakyCase] = []  # the first MAX_FLAKY (report/noise.py); flaky_total counts them all
    flaky_total: int = 0
    spreads: list[CaseSpread] = []
    baselines: list[BaselineAge] = []
    warnings: list[str] = []


class SuiteInfo(Contract):
    n: int
    created_at: str | None


class Report(Contract):
    """A release against its baseline (production, or for production itself the previous release)."""

    release: str
    model: str | None
    baseline: str | None
    baseline_stage: str | None  # production | previous
    production: str | None
    status: str  # the release's last status event, or "registered"
    verdict: str  # pass | fail | not gated | not evaluated
    gates: list[GateResult]
    metrics: list[MetricRow]
    worst_cases: WorstCases
    trend: list[TrendSeries]
    cost: ReportCost
    suites: dict[str, SuiteInfo]
    lineage: dict[str, Any]  # the manifest's lineage, free-form (git, data and config hashes)
    segments: list[SegmentRow] = []  # per-segment rows, for suites whose cases carry tags
    noise: Noise = Field(default_factory=Noise)
    new_cases: NewCases | None = None  # None: no baseline to tell new cases from
    budget: BudgetDoc | None = None  # spend against `budget:` (None when no cap is set)
