"""What a Modal workspace needs before `backend: modal` runs: which environment variables the code
looks up inside Modal, the Secret each must come from, and the environments and Secrets to create
for production and for pull requests (`mlops validate`, `mlops doctor --modal`).

A Modal container sees only its image's ENV, its function's `env=` and its Secrets: a variable
exported on the runner does not reach it. Secrets belong to one Modal environment, so the PR
environment needs its own (with its own values: never production's keys).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mlops.backends.modal_settings import KEYS_ENV, PROXY_ID_ENV, PROXY_SECRET_ENV, VLLM_KEY_ENV, ModalSettings
from mlops.config import Config
from mlops.errors import ConfigError

PR_ENVIRONMENT = "pr"  # pr-eval.yml: vars.MODAL_PR_ENVIRONMENT || 'pr'
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Lookup:
    var: str
    secret: str | None  # the Secret it must come from; None: one of `modal.secrets`, and there is none
    where: str  # the function that looks it up
    why: str
    required: bool = True  # False: only where it applies (a gated base)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _hub_id(source: str) -> bool:
    """A Hugging Face id (org/name), not a local path or `scratch`."""
    return source not in ("scratch", "") and not source.startswith((".", "/", "~")) and source.count("/") == 1


def lookups(cfg: Config, s: ModalSettings) -> list[Lookup]:
    """Every variable the code reads inside Modal, with the Secret it must come from."""
    auth = s.auth_secret
    extra = ", ".join(s.secrets) if s.secrets else None
    out = [
        Lookup(KEYS_ENV, auth, "gateway, controller", "the API keys clients present (the controller presents one)"),
        Lookup(VLLM_KEY_ENV, auth, "gateway, serve, eval", "the key every vLLM server requires"),
        Lookup(PROXY_ID_ENV, auth, "gateway, eval", "a Proxy Auth Token: per-release URLs require it"),
        Lookup(PROXY_SECRET_ENV, auth, "gateway, eval", "the Proxy Auth Token's secret"),
    ]
    if cfg.deploy.server.api_key_env:
        out.append(
            Lookup(cfg.deploy.server.api_key_env, auth, "gateway", "deploy.server.api_key_env: more client keys")
        )
    for name, j in sorted(cfg.judges.items()):
        if j.api_key_env and not j.self_hosted:
            out.append(Lookup(j.api_key_env, extra, "eval", f"judges.{name}.api_key_env: the judge's API key"))
        if j.self_hosted and j.source and _hub_id(j.source):
            out.append(Lookup("HF_TOKEN", extra, "serve (judge)", f"judges.{name}.source is a Hub id", required=False))
    for name, m in sorted(cfg.models.items()):
        if _hub_id(m.base):
            out.append(Lookup("HF_TOKEN", extra, "train", f"models.{name}.base is a Hub id (a gated one)", False))
    if cfg.storage.startswith("s3://"):  # the rollout controller reads and moves the registry's state
        capture = cfg.monitor.enabled
        where = "gateway, controller" if capture else "controller"
        why = "the s3:// registry: " + ("capture, rollouts" if capture else "rollouts")
        out += [Lookup(v, extra, where, why) for v in AWS_VARS]
    # (W&B is not here: runs sync from the runner, never from a container.)
    unique: dict[tuple[str, str | None], Lookup] = {}
    for x in out:
        unique.setdefault((x.var, x.secret), x)
    return list(unique.values())


def by_secret(found: list[Lookup]) -> dict[str, list[str]]:
    """Secret name -> its variables (in order); `modal.secrets` (unnamed) under ''."""
    out: dict[str, list[str]] = {}
    for x in found:
        names = [n.strip() for n in (x.secret or "").split(",")]
        key = names[0] if len(names) == 1 else ""
        if x.var not in out.setdefault(key, []):
            out[key].append(x.var)
    return out


def describe(cfg: Config, s: ModalSettings) -> list[str]:
    """`mlops validate`'s lines on backend: modal."""
    env = s.environment or "the workspace's default"
    lines = [f"inside Modal (environment {env}) the code looks up:"]
    for x in lookups(cfg, s):
        src = f"Secret {x.secret}" if x.secret and "," not in x.secret else None
        if src is None:
            src = f"one of the Secrets {x.secret}" if x.secret else "a Secret you add to modal.secrets (none yet)"
        opt = " (if needed)" if not x.required else ""
        lines.append(f"  {x.var:<24} {x.where:<22} from {src}{opt}: {x.why}")
    lines.append("set them up: mlops doctor --modal (prints the commands; --apply runs them)")
    return lines


@dataclass(frozen=True)
class Step:
    environment: str | None  # None: the workspace's default environment
    kind: str  # "environment" (create it) | "secret" (create it with `names`)
    name: str
    names: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        if self.kind == "environment":
            return ["modal", "environment", "create", self.name]
        flag = ["--env", self.environment] if self.environment else []
        return ["modal", "secret", "create", *flag, self.name, *(f"{v}=${v}" for v in self.names)]

    def shell(self) -> str:
        """As an operator types it: `VAR="$VAR"` takes the value from their shell."""
        return " ".join(
            f'{a.split("=", 1)[0]}="{a.split("=", 1)[1]}"' if "=$" in a else shlex.quote(a) for a in self.argv()
        )


def steps(cfg: Config, s: ModalSettings, pr_env: str = PR_ENVIRONMENT) -> list[Step]:
    """Production's environment, then the PR environment: each created (but `main`, the default)
    with its Secrets, names only."""
    groups = by_secret(lookups(cfg, s))
    if "" in groups or None in [x.secret for x in lookups(cfg, s)]:
        names = ", ".join(x.var for x in lookups(cfg, s) if not x.secret or "," in x.secret)
        raise ConfigError(
            f"{names} must come from a Secret named in modal.secrets, which names "
            f"{', '.join(s.secrets) or 'none'}: add one Secret for them (e.g. modal.secrets: [{s.app}-keys])"
        )
    out: list[Step] = []
    for env in dict.fromkeys([s.environment, pr_env]):
        if env and env != "main":
            out.append(Step(env, "environment", env))
        for secret in [s.auth_secret, *s.secrets]:
            if groups.get(secret):
                out.append(Step(env, "secret", secret, tuple(groups[secret])))
    return out


def apply(api: Any, cfg: Config, s: ModalSettings, env: str | None, environ: Mapping[str, str]) -> list[str]:
    """Create environment `env` (unless it exists) and its Secrets, values from `environ`: all of
    them present, or nothing is written. Returns what it did, one line each."""
    todo = [st for st in steps(cfg, s, env or PR_ENVIRONMENT) if st.environment == env]
    missing = sorted({v for st in todo for v in st.names if not environ.get(v)})
    if missing:
        raise ConfigError(f"set {', '.join(missing)} in this shell first: the Secrets' values (never in mlops.yaml)")
    done = []
    for st in todo:
        if st.kind == "environment":
            if st.name not in api.environments():
                api.environment_create(st.name)
                done.append(f"created the environment {st.name}")
        else:
            api.secret_create(st.name, {v: environ[v] for v in st.names}, env=env, force=True)
            done.append(f"Secret {st.name} in {env or 'the default environment'}: {', '.join(st.names)}")
    return done
