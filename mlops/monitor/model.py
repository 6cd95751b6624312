"""The monitor report as pydantic contracts: what `analyze` returns, `report.to_markdown` renders
and `mlops monitor --json` prints (`MonitorReport.model_dump()`).

The nightly workflow and `MLOPS_DRIFT_REPORT` read that JSON, so its shape is frozen: fields are
declared in the order the keys were printed, and the keys the report only has in some cases
(`message` without traffic; `quality`, `reference`, ... with it) are left out of the dump when
unset, as before. Built by keyword only.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_serializer

from mlops.contracts import Contract

Number = int | float  # a configured threshold as given: int first, so a YAML 2 stays 2 in the JSON


class Check(Contract):
    """One statistic against its threshold in `monitor.thresholds`."""

    name: str
    group: str  # input | response | cost | slo | quality
    value: float | None
    threshold: Number | None  # None: reported, not judged
    direction: str  # max: crossed above the threshold; min: below
    p_value: float | None
    judged: bool
    drifted: bool
    detail: str


class Skipped(Contract):
    files: int  # unreadable capture files (mode 000, not a regular file, gone)
    lines: int  # malformed, truncated or over-long lines, records with a field of the wrong type


class CaptureAccount(Contract):
    """Every request the servers answered in the window: captured, or lost and why (tally.py)."""

    answered: int  # on the captured routes, by every capture writer
    captured: int  # records written
    lost: dict[str, int]  # queue_full, encode, write, unwritten (a server killed before it flushed), unreadable
    sampled_out: int  # left out by monitor.sample_rate: on purpose, not a loss
    pending: int  # answered and queued at the writer's last count (a running server)
    loss_rate: float  # sum(lost) / (answered - sampled_out)
    writers: int
    last_error: str | None  # the storage's last refusal, e.g. "disk full (No space left on device)"


class SampleMetric(Contract):
    """A reference-free suite metric on a traffic sample, beside its mean in the release's eval."""

    n: int
    mean: float
    eval_mean: float | None


class LabelledMetric(Contract):
    n: int
    mean: float


class Labelled(Contract):
    n: int = 0  # labelled requests in the window (`mlops feedback`)
    metrics: dict[str, LabelledMetric] = {}  # metric -> score on them, in the suite's order


class Quality(Contract):
    suite: str | None
    sample: dict[str, SampleMetric] = {}  # metric -> score; the metrics vary with the suite
    labelled: Labelled = Field(default_factory=Labelled)


class Reference(Contract):
    """What traffic was compared with: the release's data (`datasets`) or earlier traffic (`window`)."""

    kind: str  # data | window
    datasets: list[str] | None = None  # kind data only
    window: list[str] | None = None  # kind window only: [since, until]
    notes: list[str]
    prompts: int
    outputs: int

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        d: dict[str, Any] = handler(self)
        return {k: v for k, v in d.items() if not (k in ("datasets", "window") and v is None)}


class Histogram(Contract):
    """Shares per prompt-length bucket on both sides (the report's chart)."""

    edges: list[int]
    reference: list[float]
    traffic: list[float]


class MonitorReport(Contract):
    """One `mlops monitor` run: the window, its checks and the verdict; `drifted` names the crossed checks."""

    release: str | None
    since: str
    until: str
    requests: int
    files: int
    skipped: Skipped
    dropped: int  # requests the capture queue had no room for
    checks: list[Check] = []
    drifted: list[str] = []
    verdict: str = "no traffic"  # no traffic | drift | ok | too few requests | capture lost
    on_drift: str  # what the nightly workflow does with this report (open an issue / retrain)
    # set only without traffic
    message: str | None = None
    # set only with traffic (notes_capture: a metadata-only capture; quality: when there is text)
    notes_capture: str | None = None
    quality: Quality | None = None
    judged: bool | None = None
    reference: Reference | None = None
    histogram: dict[str, Histogram] | None = None  # "prompt_length" -> chart
    cost: dict[str, float] | None = None  # "cost_per_1k_tokens" -> the configured price
    statuses: dict[str, int] | None = None  # HTTP status -> requests; the statuses vary
    # the capture counters of the window (None: no writer counted, e.g. files from before them)
    capture: CaptureAccount | None = None
    text_dropped: int | None = None  # records whose text was over the reader's budget (numbers kept)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # the keys a report of this kind never had stay out (None is a value only for `release`)
        d: dict[str, Any] = handler(self)
        return {k: v for k, v in d.items() if k == "release" or v is not None}


class FindingRow(Contract):
    """One data-check finding as `mlops validate --data --json` prints it."""

    dataset: str
    check: str
    severity: str  # error | warn
    message: str
    rows: list[int]  # 1-based line numbers
    line: str  # the one-line message: path, check, message, the first rows


class DatasetChecks(Contract):
    path: str
    rows: int
    findings: list[FindingRow]


class DataChecks(Contract):
    """`run_checks`: every dataset's findings; `ok` is False when one is error-level."""

    ok: bool
    datasets: dict[str, DatasetChecks]  # dataset name -> its rows and findings
