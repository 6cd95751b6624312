"""`deploy.rollout.analysis` and `deploy.rollout.guardrails` (issue 19): how a live canary step is
judged, and the SLOs that watch a release after promotion (mlops/rollout_analysis.py reads both)."""

from typing import Literal, Self

from pydantic import Field, model_validator

from mlops.configbase import Strict

# The suite metrics that need no expected answer, so they can score live traffic
# (mlops/monitor/analyze.py scores the same ones on a monitor window).
REFERENCE_FREE = ("json_valid", "regex", "length")
# What `guardrails.monitor` may name: statistics computed from a capture window alone (or against
# the previous release's traffic in the same window, for the two PSIs).
GUARDRAIL_STATS = ("empty_rate", "truncated_rate", "tokens_per_request", "output_length_psi", "prompt_length_psi")


class AnalysisCfg(Strict):
    """Each canary step compares the candidate with production on the same window of real requests."""

    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Significance of one step's tests together (each of k tests is run at alpha/k, one-sided).",
    )
    min_requests: int = Field(
        50, ge=1, description="Captured requests each release needs in a window before error rate or latency may pass."
    )
    suite: str | None = Field(None, description="The eval suite whose metrics score live answers (default: the first).")
    metrics: list[str] | None = Field(
        None,
        description="Suite metrics judged on live answers (default: its reference-free ones: json_valid, regex, "
        "length). A judge metric named here is scored on `judge_sample` answers per release.",
    )
    min_samples: int = Field(30, ge=1, description="Scored live answers per release before a metric may pass.")
    sample: int = Field(200, ge=1, description="Live answers per release a metric scores in one step, at most.")
    judge_sample: int = Field(
        0, ge=0, description="Live answers per release a judge metric scores in one step (bounds judge calls)."
    )
    max_metric_drop: dict[str, float] = Field(
        {},
        description="Metric -> how much worse the candidate's mean may be before a significant difference fails "
        "(absolute, in the metric's units; default 0).",
    )
    max_extensions: int = Field(
        3, ge=0, description="Times a step with too little traffic is extended before on_insufficient_traffic."
    )
    on_insufficient_traffic: Literal["fail", "replay"] = Field(
        "fail",
        description="After max_extensions: fail the step, or judge it on replayed eval prompts "
        "(`replay_requests` per release, pinned; mlops's own requests, never captured).",
    )
    replay_requests: int = Field(50, ge=1, description="Eval prompts replayed at each release on the replay fallback.")


class GuardrailsCfg(Strict):
    """SLOs a promoted release is held to while it bakes (`bake_after_promote`): a breach rolls back."""

    max_error_rate: float | None = Field(0.05, ge=0, le=1, description="Share of 5xx/429 answers, at most.")
    max_p95_ratio: float | None = Field(
        2.0, gt=0, description="p95 latency over the previous production's (its last canary window), at most."
    )
    max_p95_ms: float | None = Field(None, gt=0, description="p95 latency in milliseconds, at most.")
    min_requests: int = Field(30, ge=1, description="Fewer captured requests in a window: the SLOs are not judged.")
    monitor: dict[str, float] = Field(
        {},
        description="Window statistic -> its maximum: " + ", ".join(GUARDRAIL_STATS) + " (the PSIs against the "
        "previous production's answers in its last canary window).",
    )

    @model_validator(mode="after")
    def _known(self) -> Self:
        bad = sorted(set(self.monitor) - set(GUARDRAIL_STATS))
        if bad:
            raise ValueError(f"unknown guardrail statistic {bad[0]!r} (valid: {', '.join(GUARDRAIL_STATS)})")
        return self
