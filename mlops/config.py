"""mlops.yaml: the pydantic schema, and a loader whose every error names file, line and key path.

    mlops.yaml:14: models.tiny.train.lr: Input should be a valid number

Load order: safe YAML (lines recorded) -> `${VAR}` from the environment -> `--set` overrides ->
pydantic (extra="forbid" everywhere) -> cross references (datasets, evals, metrics, backend).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mlops import plugins
from mlops.configdata import apply_overrides, dotted, expand_env, line_of, pydantic_error
from mlops.errors import ConfigError
from mlops.yamlload import Loc, load_yaml_file

BACKENDS = tuple(plugins.BACKENDS)  # the lazy table: names only, so `validate` stays light


def _duration(v: Any) -> Any:
    """'30m', '10s', '1h', '250ms' or a number of seconds -> float seconds."""
    if isinstance(v, bool):
        raise ValueError("expected a duration like 30s, 10m or 1h")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", v)
        if m:
            return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    raise ValueError("expected a duration like 30s, 10m or 1h")


Duration = Annotated[float, Field(ge=0), BeforeValidator(_duration)]


class Strict(BaseModel):
    # defer_build: a model is built on first use, so `validate` builds one validator (Config, with
    # the others inside it) instead of one per class at import (measured: benchmarks/bench_startup.py)
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class WandbCfg(Strict):
    project: str | None = Field(None, description="W&B project (defaults to `project`).")
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes real run files under ./wandb; online needs WANDB_API_KEY."
    )


class TrackingCfg(Strict):
    wandb: WandbCfg = WandbCfg()


# ---------------------------------------------------------------- monitor (issue 10): data checks + drift


class DataChecksCfg(Strict):
    """Checks `mlops validate --data` runs and training runs before it starts (a failure refuses it)."""

    required: dict[str, Literal["str", "int", "float", "bool", "list", "dict"]] = Field(
        {}, description="Fields every row must have, with their JSON type (default: input and target as str)."
    )
    min_length: int = Field(1, ge=0, description="Shortest input (characters); 1 refuses empty inputs.")
    max_length: int | None = Field(None, ge=1, description="Longest input (characters).")
    duplicates: Literal["error", "warn", "allow"] = Field("warn", description="Rows whose input repeats.")
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


class MonitorCfg(Strict):
    enabled: bool = Field(True, description="Capture traffic on the local server (and the Modal gateway).")
    capture: Literal["full", "metadata"] = Field(
        "full", description="full keeps prompt and output text; metadata keeps lengths and sha256 only."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of requests captured.")
    batch_size: int = Field(1000, ge=1, description="Requests per capture file.")
    flush_interval: Duration = Field(5.0, description="A partial batch is written after this long.")
    queue_size: int = Field(10000, ge=1, description="Requests waiting for the writer; more are dropped, counted.")
    window: Duration = Field(86400.0, description="Default `mlops monitor --since`.")
    min_requests: int = Field(30, ge=1, description="Fewer captured requests: statistics reported, not judged.")
    embedding_sample: int = Field(100, ge=0, description="Texts per side for embedding drift (0: off).")
    quality_sample: int = Field(200, ge=0, description="Traffic sample scored by reference-free suite metrics.")
    eval: str | None = Field(None, description="Suite whose metrics score labelled traffic (default: the first).")
    cost_per_1k_tokens: float = Field(0.0, ge=0, description="Price of 1k tokens, for cost per 1k requests.")
    on_drift: Literal["report", "retrain"] = Field("report", description="What the nightly workflow does on drift.")
    thresholds: MonitorThresholds = MonitorThresholds()


class DatasetCfg(Strict):
    path: str = Field(description="JSONL file, relative to mlops.yaml.")
    input_field: str = "input"
    target_field: str = "expected"
    checks: DataChecksCfg = DataChecksCfg()


# ---- training (issue 12): precision, accumulation, checkpoints. Kept as one block on purpose.

_DURATION_TEXT = r"^\s*\d+(\.\d+)?\s*(s|m|h)\s*$"


def _steps_or_duration(v: Any) -> Any:
    """A number of steps (int >= 1) or a duration string like 10m; anything else is one clear error."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    if isinstance(v, str) and re.fullmatch(_DURATION_TEXT, v):
        return v.strip()
    raise ValueError("expected a number of steps (e.g. 200) or a duration (e.g. 10m, 30s, 1h)")


StepsOrDuration = Annotated[
    int | str,
    BeforeValidator(_steps_or_duration),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _DURATION_TEXT}]}),
]


class TrainCfg(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(
        64, ge=1, description="Sequences per micro-batch (one optimizer step sees batch_size * grad_accum)."
    )
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads for local training (default: all cores).")
    precision: Literal["bf16", "fp16", "fp32"] | None = Field(
        None,
        description="Mixed precision (autocast; master weights stay fp32 for a full fine-tune). "
        "Default: bf16 on a GPU (fp16 where the GPU has no bf16), fp32 on CPU. fp16 needs CUDA.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% more compute."
    )
    max_seq_len: int | None = Field(
        None,
        ge=8,
        description="Truncate examples to this many tokens (the prompt's start is cut first). "
        "Default: the model's context length, and a longer example is an error.",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Every N steps, the loss on a fixed sample of the training data (no gradient)."
    )
    checkpoint_every: StepsOrDuration | None = Field(
        "10m",
        description="Write a resumable checkpoint every N steps (a number) or every duration (10m, 30s, 1h); "
        "null: never. A run started again with the same data, config and code resumes from the last one.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of a run's newest checkpoints to keep.")

    def checkpoint_interval(self) -> tuple[int | None, float | None]:
        """(every N steps, every S seconds): one of them set, or neither."""
        if self.checkpoint_every is None:
            return None, None
        if isinstance(self.checkpoint_every, int):
            return self.checkpoint_every, None
        return None, float(_duration(self.checkpoint_every))


# Modal's list prices, USD per GPU-hour (modal.com/pricing, 2026); `prices.gpu_per_hour` overrides entries.
MODAL_GPU_PRICES: dict[str, float] = {
    "T4": 0.59,
    "L4": 0.80,
    "A10G": 1.10,
    "L40S": 1.95,
    "A100-40GB": 2.10,
    "A100-80GB": 2.50,
    "H100": 3.95,
    "H200": 4.54,
    "B200": 6.25,
}


class PricesCfg(Strict):
    gpu_per_hour: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(MODAL_GPU_PRICES),
        description="USD per GPU-hour by Modal GPU type; the run record's cost comes from here. "
        "Entries you give replace the defaults of the same name; the rest stay.",
    )

    @field_validator("gpu_per_hour", mode="after")
    @classmethod
    def _over_defaults(cls, v: dict[str, float]) -> dict[str, float]:
        return MODAL_GPU_PRICES | v


# ---- end of the training block


class ArchCfg(Strict):
    """Shape of a model trained from scratch (GPT-2 architecture, so vLLM serves it unchanged)."""

    n_layer: int = Field(3, ge=1)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(64, ge=8)


class LoraCfg(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["c_attn"],
        description="Module names (suffixes) of the base model to adapt, or ['all-linear']; "
        "checked against the base model when training starts.",
    )


class ResourcesCfg(Strict):
    """Used on Modal only."""

    gpu: str | None = "A10G"
    cpu: float | None = None
    memory: int | None = Field(None, description="MiB")
    timeout: Duration = 1800.0
    min_containers: int = Field(0, ge=0)
    max_containers: int = Field(4, ge=1)


class ModelCfg(Strict):
    base: str = Field("scratch", description="'scratch', a Hugging Face id, or a local path.")
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full fine-tune; lora (peft, merged into the base); qlora (4-bit base, CUDA only)."
    )
    dataset: str = Field(description="Name of a dataset under `datasets`.")
    prompt: str = Field("{input}", description="How a case's input becomes the prompt, e.g. '{input}='.")
    max_tokens: int = Field(32, ge=1, description="Completion budget when evaluating this model.")
    train: TrainCfg = TrainCfg()
    arch: ArchCfg = ArchCfg()
    lora: LoraCfg = LoraCfg()
    resources: ResourcesCfg = ResourcesCfg()


MetricEntry = Union[str, dict[str, Any]]  # noqa: UP007 - pydantic json schema reads it better


class EvalCfg(Strict):
    dataset: str
    metrics: list[MetricEntry] = Field(min_length=1)
    concurrency: int = Field(16, ge=1, le=1024)
    timeout: Duration = Field(30.0, description="Wall-clock limit of one call; a timed-out case fails, not retried.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a call that got 429/502/503/504 or no connection.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N cases.")
    judge: str | None = Field(None, description="Default judge (a key of `judges`) for judge-based metrics.")


class GateCfg(Strict):
    eval: str
    metric: str
    stat: Literal["mean", "p50", "p95", "p99", "pass_rate"] = "mean"
    threshold: float | None = Field(None, description="pass_rate: a case passes when its score >= threshold.")
    min: float | None = None
    max: float | None = None
    max_regression: float | None = Field(None, ge=0, description="Allowed drop vs production (absolute).")
    confidence: float = Field(0.95, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _some_bound(self) -> GateCfg:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError("a gate needs at least one of min, max, max_regression")
        return self


class RolloutCfg(Strict):
    steps: list[Annotated[int, Field(ge=1, le=100)]] = [10, 50, 100]
    requests_per_step: int = Field(50, ge=1)
    bake: Duration = Field(
        0.0,
        description="How long each canary step (below 100%) bakes under real traffic before its analysis; "
        "also how long a replaced production stays loaded for instant rollback (600 s when 0).",
    )
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p95_ratio: float = Field(2.0, gt=0, description="Candidate p95 latency over production's, at most.")
    shadow: float = Field(0.0, ge=0, le=1, description="Share of traffic mirrored to the candidate.")
    # Only rollback exists: a half-rolled-out candidate left in place would be recovered (rolled
    # back) by the next run anyway, so "stop" would promise something the pipeline does not keep.
    on_failure: Literal["rollback"] = "rollback"
    lease_ttl: Duration = Field(
        30.0,
        gt=0,
        description="Rollout lease: a pipeline that stops renewing it (killed) loses its canary traffic this long after.",
    )
    lease_wait: Duration = Field(
        300.0, description="How long a second pipeline waits for the rollout lease before failing (exit 4)."
    )

    @model_validator(mode="after")
    def _increasing(self) -> RolloutCfg:
        if self.steps != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ValueError("rollout.steps must increase strictly and end at 100")
        return self


class ServerCfg(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="Env var holding the bearer key (required off loopback).")
    max_batch_size: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=1)
    request_timeout: Duration = 30.0
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies are answered 413.")


class DeployCfg(Strict):
    model: str
    engine: str = Field(
        "builtin",
        description="What generates text behind the local server: builtin (in-process, sub-second start) "
        "or vllm (vLLM's OpenAI server as a child process; `make install-vllm`).",
        json_schema_extra={"enum": list(plugins.ENGINES)},
    )
    resources: ResourcesCfg = ResourcesCfg(gpu="L4")
    rollout: RolloutCfg = RolloutCfg()
    server: ServerCfg = ServerCfg()


class JudgeCfg(Strict):
    """One judge in `mlops.yaml`: an OpenAI-compatible endpoint and how to call it.
    (`mlops.evals.judges.JudgeSpec` is this class: one definition for the file and the client.)"""

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="model id sent in the request")
    api_key_env: str | None = Field(
        default=None, description="NAME of the environment variable holding the API key (never the key)"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="wall-clock limit of one request, seconds")
    max_retries: int = Field(default=3, ge=0, description="retries after the first attempt")
    concurrency: int = Field(default=4, ge=1, description="requests in flight at once")
    repeat: int = Field(default=1, ge=1, description="ask N times per case and take the median score (noisy judges)")
    temperature: float = Field(default=0.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v


class ModalCfg(Strict):
    app_name: str | None = None
    environment: str | None = None
    secrets: list[str] = Field([], description="Names of Modal Secrets to attach (never values).")


class Config(Strict):
    project: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    backend: str = "local"
    storage: str = Field(".mlops", description="A directory, or s3://bucket/prefix.")
    baseline_storage: str | None = Field(
        None,
        description="A registry read (never written) for production's results to compare with: a pull "
        "request's candidate lives in its own storage and is gated against this one's production.",
    )
    tracking: TrackingCfg = TrackingCfg()
    datasets: dict[str, DatasetCfg]
    models: dict[str, ModelCfg] = Field(min_length=1)
    evals: dict[str, EvalCfg] = {}
    gates: list[GateCfg] = []
    judges: dict[str, JudgeCfg] = {}
    deploy: DeployCfg
    modal: ModalCfg = ModalCfg()
    monitor: MonitorCfg = MonitorCfg()
    prices: PricesCfg = PricesCfg()


class Loaded(BaseModel):
    """A validated config plus where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    cfg: Config
    path: Path
    raw: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path.parent

    def dataset_path(self, name: str) -> Path:
        return (self.root / self.cfg.datasets[name].path).resolve()


# ---------------------------------------------------------------------------- loading


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    return plugins.did_you_mean(word, options)


def load(path: str | Path = "mlops.yaml", overrides: Sequence[str] = (), check_files: bool = True) -> Loaded:
    """Read, expand, override, validate and cross-check a config; ConfigError names file:line."""
    p = Path(path)
    data, lines = load_yaml_file(p)
    src = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}:1: the top level must be a mapping of keys (project, datasets, models, ...)")
    data = expand_env(data, (), lines, src)
    overridden = apply_overrides(data, overrides)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(Config, e, src, lines, overridden) from None
    loaded = Loaded(cfg=cfg, path=p.resolve(), raw=data)
    _check_references(loaded, src, lines, overridden, check_files)
    return loaded


def _check_references(loaded: Loaded, src: str, lines: dict[Loc, int], overridden: set[str], check_files: bool) -> None:
    cfg = loaded.cfg

    def fail(loc: Sequence[str | int], msg: str) -> ConfigError:
        where = line_of(lines, loc, overridden)
        prefix = where if where.startswith("--set") else f"{src}:{where}"
        return ConfigError(f"{prefix}: {dotted(loc)}: {msg}")

    def ref(loc: Sequence[str | int], name: str, table: dict[str, Any], what: str) -> None:
        if name not in table:
            raise fail(loc, f"unknown {what} {name!r} {_did_you_mean(name, table)}".rstrip())

    if cfg.backend not in BACKENDS:
        raise fail(("backend",), f"unknown backend {cfg.backend!r} {_did_you_mean(cfg.backend, BACKENDS)}")
    if cfg.deploy.engine not in plugins.ENGINES:
        engine = cfg.deploy.engine
        raise fail(("deploy", "engine"), f"unknown engine {engine!r} {_did_you_mean(engine, plugins.ENGINES)}")
    for name, m in cfg.models.items():
        ref(("models", name, "dataset"), m.dataset, cfg.datasets, "dataset")
        if m.arch.n_embd % m.arch.n_head:
            raise fail(("models", name, "arch", "n_head"), "n_embd must be divisible by n_head")
    known = set(plugins.known_metric_names())
    for name, ev in cfg.evals.items():
        ref(("evals", name, "dataset"), ev.dataset, cfg.datasets, "dataset")
        if ev.judge is not None:
            ref(("evals", name, "judge"), ev.judge, cfg.judges, "judge")
        for i, spec in enumerate(ev.metrics):
            mname = metric_name(spec)
            if isinstance(spec, dict):
                if "name" not in spec:
                    raise fail(("evals", name, "metrics", i), "a metric mapping needs a 'name'")
                if "callable" in spec:
                    continue
                judge = spec.get("judge")
                if judge is not None:
                    ref(("evals", name, "metrics", i, "judge"), str(judge), cfg.judges, "judge")
            if mname not in known:
                raise fail(("evals", name, "metrics", i), f"unknown metric {mname!r} {_did_you_mean(mname, known)}")
    for i, g in enumerate(cfg.gates):
        ref(("gates", i, "eval"), g.eval, cfg.evals, "eval")
        names = [metric_name(s) for s in cfg.evals[g.eval].metrics]
        if g.metric not in names:
            raise fail(
                ("gates", i, "metric"), f"eval {g.eval!r} has no metric {g.metric!r} {_did_you_mean(g.metric, names)}"
            )
        if g.stat == "pass_rate" and g.threshold is None:
            raise fail(("gates", i, "threshold"), "a pass_rate gate needs a threshold")
    ref(("deploy", "model"), cfg.deploy.model, cfg.models, "model")
    if cfg.monitor.eval is not None:
        ref(("monitor", "eval"), cfg.monitor.eval, cfg.evals, "eval")
    suite = cfg.monitor.eval or next(iter(cfg.evals), None)
    for mname in cfg.monitor.thresholds.min_quality:  # labelled traffic is scored by that suite
        names = [metric_name(s) for s in cfg.evals[suite].metrics] if suite else []
        if mname not in names:
            loc = ("monitor", "thresholds", "min_quality", mname)
            raise fail(loc, f"eval {suite!r} has no metric {mname!r} {_did_you_mean(mname, names)}".rstrip())
    if check_files:
        for name, ds in cfg.datasets.items():
            f = loaded.dataset_path(name)
            if not f.is_file():
                raise fail(("datasets", name, "path"), f"file {ds.path!r} does not exist")


def metric_name(spec: str | dict[str, Any]) -> str:
    """The name of one entry of `evals.<suite>.metrics`: a string, or a mapping with `name`."""
    return spec if isinstance(spec, str) else str(spec.get("name"))


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a config section: what the plan compares between runs."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mlops.yaml"
    return schema
