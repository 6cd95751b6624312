"""mlops.yaml's `monitor:` section and the per-dataset `checks:` (issue 10): data checks and drift."""

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from mlops.configbase import Duration, Strict, _duration

# The header mlops's own requests carry (evals, canary traffic, smoke requests): the capture
# middleware skips them, as eval traffic is not user traffic. It reaches the Modal gateway too,
# where the runner's requests share production's endpoint with users.
NOT_CAPTURED = {"x-mlops-capture": "off"}
MAX_AGE_S = 3650 * 86400.0  # the longest monitor window: ten years (older is before any capture)


# > 0: an interval of 0 made the capture writer spin a core on an idle server; at most an hour of
# traffic waits in memory (the constraints of `Duration` win over a Field's, so its own type)
FlushInterval = Annotated[float, Field(ge=0.01, le=3600, allow_inf_nan=False), BeforeValidator(_duration)]


class DataChecksCfg(Strict):
    """Checks `mlops validate --data` runs and training runs before it starts (a failure refuses it)."""

    required: dict[str, Literal["str", "int", "float", "bool", "list", "dict"]] = Field(
        {}, description="Fields every row must have, with their JSON type (default: input and target as str)."
    )
    min_length: int = Field(
        1, ge=0, description="Shortest input (characters, or the base tokenizer's tokens); 1 refuses empty inputs."
    )
    max_length: int | None = Field(
        None, ge=1, description="Longest input, or chat conversation (characters, or the base tokenizer's tokens)."
    )
    duplicates: Literal["error", "warn", "allow"] = Field(
        "warn", description="Rows whose input (chat: whole conversation) repeats."
    )
    leakage: Literal["error", "warn", "allow"] = Field(
        "error", description="Training rows whose input appears in an eval set of the same model."
    )


class MonitorThresholds(Strict):
    """A statistic crosses its threshold -> `mlops monitor` exits 3 naming it; null: reported only."""

    p_value: float = Field(0.01, gt=0, lt=1, description="Significance for KS and chi-square (with an effect size).")
    prompt_length_psi: float | None = Field(0.2, ge=0, description="PSI of prompt length, at most.")
    prompt_length_ks: float | None = Field(0.2, ge=0, le=1, description="KS statistic D of prompt length, at most.")
    char_js: float | None = Field(0.2, ge=0, le=1, description="Jensen-Shannon distance of characters, at most.")
    embedding_auc: float | None = Field(0.8, ge=0.5, le=1, description="MiniLM domain-classifier AUC, at most.")
    output_length_psi: float | None = Field(0.25, ge=0, description="PSI of output length vs the eval outputs.")
    empty_rate: float | None = Field(0.5, ge=0, le=1, description="Share of empty answers, at most.")
    truncated_rate: float | None = Field(None, ge=0, le=1, description="Share stopped by max_tokens, at most.")
    error_rate: float | None = Field(0.05, ge=0, le=1, description="Share of 5xx/429 answers, at most.")
    p95_latency: Duration | None = Field(2.0, description="p95 latency of captured requests, at most.")
    tokens_per_request: float | None = Field(None, ge=0, description="Mean prompt+completion tokens, at most.")
    cost_per_1k_requests: float | None = Field(None, ge=0, description="At most (needs cost_per_1k_tokens).")
    min_quality: dict[str, float] = Field({}, description="Suite metric -> lowest mean on labelled traffic.")


class ExportCasesCfg(Strict):
    """What the nightly workflow runs as `mlops cases export` before it opens a pull request with the cases."""

    to: str = Field("evals/from-traffic.jsonl", description="The JSONL file the cases are added to.")
    since: Duration = Field(86400.0 * 7, gt=0, le=MAX_AGE_S, description="Traffic of this last window (7d).")
    labelled: bool = Field(True, description="Only requests with an `mlops feedback` label (their expected answer).")
    failed: bool = Field(False, description="Only answers the suite's metric scores wrong (a judge metric first).")


class MonitorCfg(Strict):
    enabled: bool = Field(True, description="Capture traffic on the local server (and the Modal gateway).")
    capture: Literal["full", "metadata"] = Field(
        "full", description="full keeps prompt and output text; metadata keeps lengths and sha256 only."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of requests captured.")
    batch_size: int = Field(1000, ge=1, description="Requests per capture file.")
    flush_interval: FlushInterval = Field(
        5.0, description="A partial batch (and the loss counters) is written after this long (10ms to 1h)."
    )
    queue_size: int = Field(10000, ge=1, description="Requests waiting for the writer; more are dropped, counted.")
    window: Duration = Field(
        86400.0, gt=0, le=MAX_AGE_S, description="Default `mlops monitor --since` (30m, 24h, 7d; at most 3650d)."
    )
    max_loss_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of answered requests capture may lose (queue full, encode, write, unreadable) "
        "before `mlops monitor` exits 4 instead of judging drift; sampling is not a loss.",
    )
    min_requests: int = Field(30, ge=1, description="Fewer captured requests: statistics reported, not judged.")
    embedding_sample: int = Field(100, ge=0, description="Texts per side for embedding drift (0: off).")
    quality_sample: int = Field(200, ge=0, description="Traffic sample scored by reference-free suite metrics.")
    eval: str | None = Field(None, description="Suite whose metrics score labelled traffic (default: the first).")
    cost_per_1k_tokens: float = Field(0.0, ge=0, description="Price of 1k tokens, for cost per 1k requests.")
    on_drift: Literal["report", "retrain"] = Field("report", description="What the nightly workflow does on drift.")
    thresholds: MonitorThresholds = MonitorThresholds.model_construct()
    export_cases: ExportCasesCfg | None = Field(
        None, description="Set: the nightly workflow opens a pull request adding traffic as eval cases."
    )
