"""mlops.yaml: the pydantic schema, and a loader whose every error names file, line and key path.

    mlops.yaml:14: models.tiny.train.lr: Input should be a valid number

Load order: safe YAML (lines recorded) -> `${VAR}` from the environment -> `--set` overrides ->
pydantic (extra="forbid" everywhere) -> cross references (datasets, evals, metrics, backend).
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Self, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from mlops import plugins
from mlops.configbase import Duration, Strict, _duration  # noqa: F401 - re-exported
from mlops.configbudget import BudgetCfg
from mlops.configdata import apply_overrides, dotted, expand_env, line_of, pydantic_error
from mlops.configmonitor import DataChecksCfg, MonitorCfg, MonitorThresholds  # noqa: F401 - re-exported
from mlops.configrollout import AnalysisCfg, GuardrailsCfg
from mlops.configtrain import MODAL_GPU_PRICES, PricesCfg, StepsOrDuration, TrainCfg  # noqa: F401 - re-exported
from mlops.configvllm import VllmCfg, gpu_count
from mlops.errors import ConfigError, UsageError
from mlops.yamlload import Loc, load_yaml_file

BACKENDS = tuple(plugins.BACKENDS)  # the lazy table: names only, so `validate` stays light


class WandbCfg(Strict):
    project: str | None = Field(None, description="W&B project (defaults to `project`).")
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes real run files under ./wandb; online needs WANDB_API_KEY."
    )


class MlflowCfg(Strict):
    """An MLflow tracking server (mlops/tracking_mlflow.py): runs, and releases as model versions."""

    tracking_uri: str = Field(
        description="The server's URL, e.g. http://127.0.0.1:5000 (`${VAR}` for a secret host or token)."
    )
    experiment: str | None = Field(None, description="Experiment name (defaults to `project`).")
    model_name: str | None = Field(
        None, description="Registered model name (defaults to `<project>-<model>`); aliases follow the registry."
    )
    token_env: str | None = Field(
        None, description="Environment variable holding a bearer token, if the server needs one."
    )
    timeout: float = Field(
        5.0, gt=0, le=120, description="Seconds per request; a server that is down costs this, retried."
    )


class TrackingCfg(Strict):
    wandb: WandbCfg = WandbCfg.model_construct()
    mlflow: MlflowCfg | None = Field(None, description="Also log to MLflow (beside W&B); unset: off.")


# monitor (issue 10): data checks + drift, in mlops/configmonitor.py


class DatasetCfg(Strict):
    path: str = Field(
        description="Where the rows are: a .jsonl, .parquet or .csv file or a `datasets.save_to_disk` directory "
        "(relative to mlops.yaml), `hf:org/name[:split]` (Hugging Face `datasets`; offline flags honoured), "
        "or `s3://bucket/key` (copied into the local cache)."
    )
    format: Literal["pairs", "chat", "completion"] | None = Field(
        None,
        description="pairs: input/expected; chat: OpenAI fine-tuning `messages`; completion: prompt/completion. "
        "Absent: detected from the first row.",
    )
    input_field: str = Field("input", description="pairs: the field holding the input.")
    target_field: str = Field("expected", description="pairs: the field holding the reference answer.")
    checks: DataChecksCfg = DataChecksCfg.model_construct()


# training (issue 12): precision, accumulation, checkpoints, in mlops/configtrain.py


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
        description="Module names (suffixes) of the base model to adapt, or ['all-linear'] (one name "
        "may be a string, as peft spells it: all-linear); checked against the base model when training starts.",
    )
    serve: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: the release is the base with the adapters folded in (a full model, served alone); "
        "adapter: the release is the peft adapter plus the base's fingerprint, loaded at run time into one "
        "shared base (many releases on one loaded model). method: full always releases a full model.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        # peft's own configs write `target_modules: all-linear`; a reader copying one must not hit a type error
        return [v] if isinstance(v, str) else v


class ResourcesCfg(Strict):
    """Used on Modal only."""

    gpu: str | None = Field("A10G", description="Modal GPU type, with a count for several: L4, A10G, H100:2.")
    cpu: float | None = None
    memory: int | None = Field(None, description="MiB")
    timeout: Duration = 1800.0
    min_containers: int = Field(0, ge=0)
    max_containers: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> Self:
        # Modal refuses the decorator (InvalidError) at deploy: say so at validate instead
        if self.min_containers > self.max_containers:
            raise ValueError(
                f"min_containers ({self.min_containers}) cannot be greater than max_containers ({self.max_containers})"
            )
        return self

    @field_validator("gpu")
    @classmethod
    def _gpu_count(cls, v: str | None) -> str | None:
        gpu_count(v)
        return v


class ModelCfg(Strict):
    base: str = Field("scratch", description="'scratch', a Hugging Face id, or a local path.")
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full fine-tune; lora (peft; merged into the base unless lora.serve: adapter); qlora (4-bit base, CUDA only).",
    )
    dataset: str = Field(description="Name of a dataset under `datasets`.")
    prompt: str = Field("{input}", description="How a case's input becomes the prompt, e.g. '{input}='.")
    max_tokens: int = Field(32, ge=1, description="Completion budget when evaluating this model.")
    train: TrainCfg = TrainCfg.model_construct()
    arch: ArchCfg = ArchCfg.model_construct()
    lora: LoraCfg = LoraCfg.model_construct()
    resources: ResourcesCfg = ResourcesCfg.model_construct()

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> Self:
        if self.lora.serve == "adapter" and self.method == "full":
            raise ValueError("lora.serve: adapter needs method: lora or qlora (a full fine-tune has no adapter)")
        return self


MetricEntry = Union[str, dict[str, Any]]  # noqa: UP007 - pydantic json schema reads it better


class EvalCfg(Strict):
    dataset: str
    metrics: list[MetricEntry] = Field(min_length=1)
    concurrency: int = Field(16, ge=1, le=1024)
    timeout: Duration = Field(30.0, description="Wall-clock limit of one call; a timed-out case fails, not retried.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a call that got 429/502/503/504 or no connection.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N cases.")
    judge: str | None = Field(None, description="Default judge (a key of `judges`) for judge-based metrics.")
    quarantine: list[str] = Field(
        [], description="Case ids kept out of every gate on this suite (still scored and shown in the report)."
    )
    baseline_max_age: Duration | None = Field(
        2_592_000.0,
        description="Production's stored results on this suite older than this are flagged as a stale "
        "baseline (by `mlops plan` and the report); null: never.",
    )


class GateCfg(Strict):
    eval: str
    metric: str
    stat: Literal["mean", "p50", "p95", "p99", "pass_rate"] = "mean"
    threshold: float | None = Field(None, description="pass_rate: a case passes when its score >= threshold.")
    min: float | None = None
    max: float | None = None
    max_regression: float | None = Field(None, ge=0, description="Allowed drop vs production (absolute).")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    segment: str | None = Field(
        None,
        min_length=1,
        description="Only the cases with this tag: bounds and the no-regression check on that slice alone.",
    )
    exclude_flaky: bool = Field(
        False,
        description="Keep flaky cases out of this gate: those whose verdict flips between a judge's repeats "
        "or between releases with identical weights (listed in the report either way).",
    )

    @model_validator(mode="after")
    def _some_bound(self) -> Self:
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
    traffic: Literal["replay", "live"] = Field(
        "replay",
        description="What a canary step is judged on: `replay` sends the first eval suite's inputs as users "
        "(the CI job with --wait, the rollout controller once the job returned) on top of live requests; "
        "`live` judges real requests only.",
    )
    interval: Duration = Field(
        5.0,
        gt=0,
        description="How often the rollout controller judges a live window (production's, during "
        "bake_after_promote); a step is judged when its bake is over.",
    )
    bake_after_promote: Duration = Field(
        0.0,
        description="Guardrail after promotion: for this long the previous release stays loaded and the "
        "controller judges production's live traffic; an SLO breach (error rate, p95) rolls back.",
    )
    analysis: AnalysisCfg = Field(
        AnalysisCfg.model_construct(), description="How a step is judged on live traffic (README, Live analysis)."
    )
    guardrails: GuardrailsCfg = Field(
        GuardrailsCfg.model_construct(), description="SLOs a promoted release is held to while it bakes."
    )

    @model_validator(mode="after")
    def _increasing(self) -> Self:
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


class DeployModelBase(Strict):
    """One entry of `deploy.models`: what this model changes from the `deploy` block's defaults
    (each key given here is merged over the same key of `deploy`)."""

    evals: list[str] | None = Field(None, description="The eval suites this model is gated on (default: every suite).")
    gates: list[GateCfg] | None = Field(None, description="This model's gates (default: the top-level `gates`).")


if TYPE_CHECKING:
    DeployModelCfg = DeployModelBase  # at run time: built from DeployCfg's fields below

MULTI_HINT = "see README 'Several deployed models'"
SHARED_KEYS = ("model", "models", "server")  # one server for every deployed model: never per model


class DeployCfg(Strict):
    model: str = Field("", description="The one deployed model (a key of `models`); or use `models` for several.")
    models: dict[str, "DeployModelCfg"] = Field(
        {},
        description="Several deployed models: model name -> what it changes from this block's defaults "
        "(each has its own stages, routing, canary, gates and rollback).",
    )
    engine: str = Field(
        "builtin",
        description="What generates text behind the local server: builtin (in-process, sub-second start) "
        "or vllm (vLLM's OpenAI server as a child process; `make install-vllm`).",
        json_schema_extra={"enum": list(plugins.ENGINES)},
    )
    resources: ResourcesCfg = ResourcesCfg.model_construct(gpu="L4")
    rollout: RolloutCfg = RolloutCfg.model_construct()
    server: ServerCfg = ServerCfg.model_construct()
    vllm: VllmCfg = Field(
        VllmCfg.model_construct(),
        description="How vLLM serves the model (Modal; deploy.engine: vllm). The builtin engine takes "
        "max_model_len and max_num_seqs and ignores the rest.",
    )

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if self.model and self.models:
            raise ValueError(f"give either model (one deployed model) or models (several), not both; {MULTI_HINT}")
        if not self.model and not self.models:
            raise ValueError(f"name the deployed model (model: NAME) or several (models: {{NAME: {{}}}}); {MULTI_HINT}")
        return self

    @property
    def names(self) -> list[str]:
        """The deployed models, in file order."""
        return [self.model] if self.model else list(self.models)


def _per_model() -> type[DeployModelBase]:
    """Every key of `deploy` but the shared ones, optional: a key added to DeployCfg (engine
    settings, say) can be set per model without a second definition to keep in step."""
    fields: dict[str, Any] = {
        k: (Optional[f.annotation], Field(None, description=f"This model's {k} (merged over deploy.{k})."))  # noqa: UP045
        for k, f in DeployCfg.model_fields.items()
        if k not in SHARED_KEYS
    }
    return create_model("DeployModelCfg", __base__=DeployModelBase, __doc__=DeployModelBase.__doc__, **fields)


if not TYPE_CHECKING:
    DeployModelCfg = _per_model()
# DeployCfg refers to DeployModelCfg (above): pydantic resolves it when the config is first validated (defer_build)


class JudgeCfg(Strict):
    """One judge in `mlops.yaml`: an OpenAI-compatible endpoint and how to call it, or a model that
    `backend: modal` serves as the judge's own vLLM app (`source` and `gpu`; see functions/serve.py).
    (`mlops.evals.judges.JudgeSpec` is this class: one definition for the file and the client.)"""

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (or `source`)"
    )
    model: str = Field(description="model id sent in the request (a self-hosted judge's served name)")
    source: str | None = Field(
        default=None,
        description="self-hosted judge (backend: modal): a local model directory (relative to mlops.yaml), "
        "release:<id> from the registry, or a Hugging Face id; served as its own vLLM app",
    )
    gpu: str | None = Field(default=None, description="the Modal GPU of a self-hosted judge's app (default L4)")
    api_key_env: str | None = Field(
        default=None, description="NAME of the environment variable holding the API key (never the key)"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="wall-clock limit of one request, seconds")
    max_retries: int = Field(default=3, ge=0, description="retries after the first attempt")
    concurrency: int = Field(default=4, ge=1, description="requests in flight at once")
    repeat: int = Field(default=1, ge=1, description="ask N times per case and take the median score (noisy judges)")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int | None = Field(
        default=None, ge=1, description="completion limit sent with each request (a server's default may cut an answer)"
    )

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _one_endpoint(self) -> Self:
        if (self.base_url is None) == (self.source is None):
            raise ValueError("a judge needs exactly one of base_url (an endpoint) or source (a model to serve)")
        if self.gpu is not None and self.source is None:
            raise ValueError("gpu is only for a self-hosted judge (one with source)")
        return self

    @property
    def self_hosted(self) -> bool:
        return self.source is not None


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
    tracking: TrackingCfg = TrackingCfg.model_construct()
    datasets: dict[str, DatasetCfg]
    models: dict[str, ModelCfg] = Field(min_length=1)
    evals: dict[str, EvalCfg] = {}
    gates: list[GateCfg] = []
    judges: dict[str, JudgeCfg] = {}
    deploy: DeployCfg
    modal: ModalCfg = ModalCfg.model_construct()
    monitor: MonitorCfg = MonitorCfg.model_construct()
    prices: PricesCfg = PricesCfg.model_construct()
    budget: BudgetCfg = Field(
        BudgetCfg.model_construct(), description="Caps per run and per month on training, judges and serving."
    )


class Loaded(BaseModel):
    """A validated config plus where it came from."""

    # Built by `load` from a validated Config (model_construct: nothing left to check), so its own
    # validator, which would hold a second copy of Config's, is never built (measured: bench_startup).
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, defer_build=True)

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
    loaded = Loaded.model_construct(cfg=cfg, path=p.resolve(), raw=data)
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
    engines: list[tuple[tuple[str, ...], str]] = [(("deploy", "engine"), cfg.deploy.engine)]
    engines += [
        (("deploy", "models", n, "engine"), e)
        for n, d in cfg.deploy.models.items()
        if (e := getattr(d, "engine", None))
    ]
    for loc, engine in engines:
        if engine not in plugins.ENGINES:
            raise fail(loc, f"unknown engine {engine!r} {_did_you_mean(engine, plugins.ENGINES)}")
    for name, m in cfg.models.items():
        ref(("models", name, "dataset"), m.dataset, cfg.datasets, "dataset")
        if m.arch.n_embd % m.arch.n_head:
            raise fail(("models", name, "arch", "n_head"), "n_embd must be divisible by n_head")
    for name, j in cfg.judges.items():
        if j.self_hosted and cfg.backend != "modal":  # only the Modal backend deploys a judge's own app
            raise fail(
                ("judges", name, "source"),
                f"a self-hosted judge is served on backend: modal (backend is {cfg.backend!r}); "
                "give it a base_url instead to use it here",
            )
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
    gate_lists: list[tuple[tuple[str, ...], list[GateCfg], dict[str, EvalCfg]]] = [(("gates",), cfg.gates, cfg.evals)]
    if cfg.deploy.model:
        ref(("deploy", "model"), cfg.deploy.model, cfg.models, "model")
    for name, d in cfg.deploy.models.items():
        ref(("deploy", "models", name), name, cfg.models, "model")
        suites = cfg.evals
        if d.evals is not None:
            for i, ev_name in enumerate(d.evals):
                ref(("deploy", "models", name, "evals", i), ev_name, cfg.evals, "eval")
            suites = {k: v for k, v in cfg.evals.items() if k in d.evals}
        if d.gates is not None:
            gate_lists.append((("deploy", "models", name, "gates"), d.gates, suites))
    for at, gates, suites in gate_lists:
        for i, g in enumerate(gates):
            ref((*at, i, "eval"), g.eval, suites, "eval")
            names = [metric_name(s) for s in suites[g.eval].metrics]
            if g.metric not in names:
                msg = f"eval {g.eval!r} has no metric {g.metric!r} {_did_you_mean(g.metric, names)}"
                raise fail((*at, i, "metric"), msg)
            if g.stat == "pass_rate" and g.threshold is None:
                raise fail((*at, i, "threshold"), "a pass_rate gate needs a threshold")
            if g.segment is not None and check_files:
                ev = suites[g.eval]
                tags = _suite_tags(loaded.dataset_path(ev.dataset), ev.limit)
                if tags is not None and g.segment not in tags:
                    have = _did_you_mean(g.segment, tags) if tags else "(no case of the suite has tags)"
                    raise fail((*at, i, "segment"), f"no case of eval {g.eval!r} has tag {g.segment!r} {have}")
    if cfg.monitor.eval is not None:
        ref(("monitor", "eval"), cfg.monitor.eval, cfg.evals, "eval")
    suite = cfg.monitor.eval or next(iter(cfg.evals), None)
    for mname in cfg.monitor.thresholds.min_quality:  # labelled traffic is scored by that suite
        names = [metric_name(s) for s in cfg.evals[suite].metrics] if suite else []
        if mname not in names:
            loc = ("monitor", "thresholds", "min_quality", mname)
            raise fail(loc, f"eval {suite!r} has no metric {mname!r} {_did_you_mean(mname, names)}".rstrip())
    rollouts: list[tuple[tuple[str, ...], RolloutCfg]] = [(("deploy", "rollout"), cfg.deploy.rollout)]
    for n, d in cfg.deploy.models.items():
        if (per := getattr(d, "rollout", None)) is not None:  # DeployModelCfg is built from DeployCfg's fields
            rollouts.append((("deploy", "models", n, "rollout"), per))
    for at, ro in rollouts:
        _check_analysis(cfg, at, ro.analysis, fail)
    if check_files:
        for name, m in cfg.models.items():
            # a path-looking base or an entrypoint that is not there fails here, in one line,
            # rather than as a Hub lookup (offline) or an import error minutes into a run
            if m.base.startswith(("./", "../", "/", "~")) and not (loaded.root / Path(m.base).expanduser()).is_dir():
                raise fail(("models", name, "base"), f"local base directory {m.base!r} does not exist")
            ep = m.train.entrypoint
            if ep is not None and not (loaded.root / ep.rsplit(":", 1)[0]).is_file():
                raise fail(("models", name, "train", "entrypoint"), f"file {ep.rsplit(':', 1)[0]!r} does not exist")
        for name, ds in cfg.datasets.items():
            if ds.path.startswith(("hf:", "s3://")):
                continue  # remote: checked when read (`validate` stays offline and light)
            f = loaded.dataset_path(name)
            if not f.exists():
                raise fail(("datasets", name, "path"), f"file {ds.path!r} does not exist")


def _check_analysis(
    cfg: "Config", at: tuple[str, ...], an: AnalysisCfg, fail: Callable[[Sequence[str | int], str], ConfigError]
) -> None:
    """`rollout.analysis` names a suite and metrics that exist, and only metrics live answers can take:
    reference-free ones, or a judge metric with a judge sample."""
    from mlops.configrollout import REFERENCE_FREE

    loc = (*at, "analysis")
    if an.suite is not None and an.suite not in cfg.evals:
        raise fail((*loc, "suite"), f"unknown eval {an.suite!r} {_did_you_mean(an.suite, cfg.evals)}".rstrip())
    suite = an.suite or next(iter(cfg.evals), None)
    names = [metric_name(s) for s in cfg.evals[suite].metrics] if suite else []
    for m in an.max_metric_drop:
        if m not in names:
            msg = f"eval {suite!r} has no metric {m!r} {_did_you_mean(m, names)}".rstrip()
            raise fail((*loc, "max_metric_drop", m), msg)
    for i, m in enumerate(an.metrics or []):
        if m not in names:
            raise fail((*loc, "metrics", i), f"eval {suite!r} has no metric {m!r} {_did_you_mean(m, names)}".rstrip())
        if m in plugins.JUDGE_METRICS:
            if not an.judge_sample:
                raise fail(
                    (*loc, "metrics", i), f"{m!r} asks a judge: set analysis.judge_sample (answers judged per step)"
                )
        elif m not in REFERENCE_FREE:
            msg = f"{m!r} needs an expected answer, which live traffic has not (judge: {', '.join(REFERENCE_FREE)} or a judge metric)"
            raise fail((*loc, "metrics", i), msg)


def resolve_model(loaded: Loaded, model: str | None) -> str:
    """The deployed model a command acts on: `model` (checked), or the only one; with several
    deployed and none named, a one-line error listing them."""
    names = loaded.cfg.deploy.names
    if model is not None:
        if model not in names:
            raise UsageError(
                f"model {model!r} is not deployed {_did_you_mean(model, names)} (deployed: {', '.join(names)})"
            )
        return model
    if len(names) > 1:
        raise UsageError(f"several models are deployed ({', '.join(names)}): name one with --model")
    return names[0]


def owner(models: list[str], name: str) -> str | None:
    """The deployed model `name` is, or whose release id it is (`<model>-<stamp>-<hex>`)."""
    if name in models:
        return name
    hits = [m for m in models if name.startswith(m + "-")]
    return max(hits, key=len) if hits else None


def narrow(loaded: Loaded, model: str) -> Loaded:
    """The config as seen by one deployed model: `deploy` is that model's merged settings
    (`deploy.model` set, `deploy.models` empty), `evals` and `gates` are the ones it is gated on.
    With one deployed model this is the config itself."""
    cfg = loaded.cfg
    d = cfg.deploy
    if d.model == model and not d.models:
        return loaded
    entry = d.models[model]
    base = d.model_dump(exclude={"model", "models"})
    own = entry.model_dump(exclude_unset=True, exclude={"evals", "gates"})
    merged = DeployCfg.model_validate(_deep_merge(base, own) | {"model": model})
    evals = cfg.evals if entry.evals is None else {k: v for k, v in cfg.evals.items() if k in entry.evals}
    gates = cfg.gates if entry.gates is None else entry.gates
    if entry.evals is not None:
        gates = [g for g in gates if g.eval in evals]
    view = cfg.model_copy(update={"deploy": merged, "evals": evals, "gates": gates})
    return Loaded.model_construct(cfg=view, path=loaded.path, raw=loaded.raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _suite_tags(path: Path, limit: int | None) -> set[str] | None:
    """The tags of a suite's cases when its dataset is a local JSONL file that reads cleanly, else None
    (the eval checks a gate's segment then, once the harness has read the cases)."""
    import json  # here, not at import: only a config with segment gates reads its data

    tags: set[str] = set()
    try:
        if path.suffix != ".jsonl" or not path.is_file():
            return None
        with path.open(encoding="utf-8") as fh:
            rows = (json.loads(line) for line in fh if line.strip())
            for n, row in enumerate(rows):
                if limit is not None and n >= limit:
                    break
                t = row.get("tags") or ()
                tags.update([t] if isinstance(t, str) else t)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return tags


def metric_name(spec: str | dict[str, Any]) -> str:
    """The name of one entry of `evals.<suite>.metrics`: a string, or a mapping with `name`."""
    return spec if isinstance(spec, str) else str(spec.get("name"))


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a config section: what the plan compares between runs."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    import hashlib
    import json  # here, not at import: `validate` needs neither

    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mlops.yaml"
    return schema
