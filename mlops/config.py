"""mlops.yaml: the pydantic schema, and a loader whose every error names file, line and key path.

    mlops.yaml:14: models.tiny.train.lr: Input should be a valid number

Load order: safe YAML (lines recorded) -> `${VAR}` from the environment -> `--set` overrides ->
pydantic (extra="forbid" everywhere) -> cross references (datasets, evals, metrics, backend).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mlops import plugins
from mlops.errors import ConfigError
from mlops.redact import remember
from mlops.yamlload import Loc, load_yaml, load_yaml_file

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


class DatasetCfg(Strict):
    path: str = Field(description="JSONL file, relative to mlops.yaml.")
    input_field: str = "input"
    target_field: str = "expected"


class TrainCfg(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads for local training (default: all cores).")


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
    target_modules: list[str] = ["c_attn"]


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
    method: Literal["full", "lora"] = "full"
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
    resources: ResourcesCfg = ResourcesCfg(gpu="L4")
    rollout: RolloutCfg = RolloutCfg()
    server: ServerCfg = ServerCfg()


class JudgeCfg(Strict):
    base_url: str
    model: str
    api_key_env: str | None = Field(None, description="NAME of the env var holding the key; never the key.")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0)
    concurrency: int = Field(4, ge=1)
    repeat: int = Field(1, ge=1)
    temperature: float = 0.0


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


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for 'did you mean')."""
    cls: Any = Config
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        cls = _unwrap(ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """dict[str, M] / list[M] / M | None -> M: the model a nested key lives in."""
    for _ in range(4):
        origin = get_origin(ann)
        if origin is dict:
            ann = get_args(ann)[1]
        elif origin is list:
            ann = get_args(ann)[0]
        elif origin is not None:
            models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not models:
                return None
            ann = models[0]
        else:
            return ann
    return ann


def _line(lines: dict[Loc, int], loc: Sequence[str | int], overridden: set[str]) -> str:
    path = tuple(str(p) if not isinstance(p, int) else p for p in loc)
    for i in range(len(path), 0, -1):
        dotted = ".".join(str(p) for p in path[:i])
        if dotted in overridden:
            return f"--set {dotted}"
        if path[:i] in lines:
            return str(lines[path[:i]])
    return str(lines.get((), 1))


def _dotted(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "json-or-python")))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(data: Any, path: Loc, lines: dict[Loc, int], src: str) -> Any:
    if isinstance(data, dict):
        return {k: _expand_env(v, (*path, str(k)), lines, src) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, (*path, i), lines, src) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:

        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise ConfigError(
                    f"{src}:{lines.get(path, 1)}: {_dotted(path)}: environment variable {m.group(1)} is not set"
                )
            if m.group(1) in os.environ:  # a default written in the file is no secret
                remember(val, m.group(1))
            return val

        return _ENV.sub(sub, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """`a.b.c=value` (value parsed as YAML) onto `data`; returns the dotted paths set."""
    done: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        # the same bounded loader as files (alias bombs, recursion, depth); its errors name the flag
        parsed = load_yaml(value, f"--set {key}")[0] if value.strip() else ""
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a mapping")
            node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise ConfigError(f"--set {key}: parent is not a mapping")
        done.add(key)
    return done


def _pydantic_error(e: ValidationError, src: str, lines: dict[Loc, int], overridden: set[str]) -> ConfigError:
    err = e.errors()[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    where = _line(lines, loc, overridden)
    prefix = f"{src}:{where}" if not where.startswith("--set") else where
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        owner = _model_at(_fields_only(loc[:-1]))
        hint = _did_you_mean(key, owner.model_fields) if owner else ""
        return ConfigError(f"{prefix}: {_dotted(loc)}: unknown key {key!r} {hint}".rstrip())
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "required key is missing"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ConfigError(f"{prefix}: {_dotted(loc) or '(top level)'}: {msg}{more}")


def _fields_only(loc: Sequence[str | int]) -> list[str]:
    """Walk a loc through Config, keeping only model field names (dropping dict keys / indices)."""
    out: list[str] = []
    cls: Any = Config
    expect_container = False
    for part in loc:
        if expect_container:
            expect_container = False
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel) and str(part) in cls.model_fields:
            out.append(str(part))
            ann = cls.model_fields[str(part)].annotation
            origin = get_origin(ann)
            if origin in (dict, list):
                expect_container = True
            cls = _unwrap(ann)
    return out


def load(path: str | Path = "mlops.yaml", overrides: Sequence[str] = (), check_files: bool = True) -> Loaded:
    """Read, expand, override, validate and cross-check a config; ConfigError names file:line."""
    p = Path(path)
    data, lines = load_yaml_file(p)
    src = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}:1: the top level must be a mapping of keys (project, datasets, models, ...)")
    data = _expand_env(data, (), lines, src)
    overridden = apply_overrides(data, overrides)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(e, src, lines, overridden) from None
    loaded = Loaded(cfg=cfg, path=p.resolve(), raw=data)
    _check_references(loaded, src, lines, overridden, check_files)
    return loaded


def _check_references(loaded: Loaded, src: str, lines: dict[Loc, int], overridden: set[str], check_files: bool) -> None:
    cfg = loaded.cfg

    def fail(loc: Sequence[str | int], msg: str) -> ConfigError:
        where = _line(lines, loc, overridden)
        prefix = where if where.startswith("--set") else f"{src}:{where}"
        return ConfigError(f"{prefix}: {_dotted(loc)}: {msg}")

    def ref(loc: Sequence[str | int], name: str, table: dict[str, Any], what: str) -> None:
        if name not in table:
            raise fail(loc, f"unknown {what} {name!r} {_did_you_mean(name, table)}".rstrip())

    if cfg.backend not in BACKENDS:
        raise fail(("backend",), f"unknown backend {cfg.backend!r} {_did_you_mean(cfg.backend, BACKENDS)}")
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
