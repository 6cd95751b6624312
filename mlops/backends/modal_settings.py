"""The names and settings that `ModalBackend` and `functions/*.py` must agree on.

What runs where (every name below is derived here from mlops.yaml, never typed twice):

    {app}-train            functions/train.py    `train`: trains on a GPU, writes runs/<run>/ on the Volume
    {app}-gateway          functions/gateway.py  `gateway`: the stable HTTPS endpoint; routes by the state
    {app}-serve-<release>  functions/serve.py    `serve`: vLLM's OpenAI server for one release
    {app}-judge-<name>     functions/serve.py    `serve` with MLOPS_JUDGE: a self-hosted judge's vLLM
    {app}-eval             functions/evaluate.py `score`: heavy metrics (judges, embeddings) over case batches
    {app}-controller       functions/controller.py `controller`: the rollout controller, on a schedule
    {app}-artifacts  a Modal Volume   runs/<run>/ (training output), releases/<id>/ (what vLLM serves),
                                      routing/state.json (the durable copy of the routing state),
                                      controller/<digest>.json (the config the controller judges by)
    {app}-state      a Modal Dict     "state": the routing State ("state:<model>" each, several models
                                      deployed); "code:<app>": the code it was deployed with;
                                      "failure:<app>": why that app's server died at start;
                                      "inuse:<release>@<holder>": a live process uses that release
    {app}-auth       a Modal Secret (yours)   MLOPS_API_KEYS, MLOPS_VLLM_API_KEY,
                                              MLOPS_PROXY_TOKEN_ID, MLOPS_PROXY_TOKEN_SECRET

`{app}` is `modal.app_name`, or `mlops-<project>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlops.config import Config, DeployCfg, Loaded, narrow
from mlops.registry.releases import sha256_file
from mlops.serving.vllm_argv import DEFAULT_OPTIONS, config_args, lora_args

SETTINGS_ENV = "MLOPS_MODAL_SETTINGS"  # JSON of ModalSettings, set on every function's container
TWIN_ENV = "MLOPS_MODAL_TWIN"  # a directory: run Modal's part on this machine (see modal_twin.py)
VOLUME_MOUNT = "/vol"
BASES = "bases"  # local base directories, copied to the Volume by fingerprint (ModalBackend._ship_base)
VLLM_PORT = 8000
BASE_APP_CHARS = 12  # of a base's key in its app's name (Modal's 63-character limit)
STATE_KEY = "state"
STATE_FILE = "routing/state.json"  # Dict entries expire after 7 idle days; the Volume keeps this one
KEYS_ENV = "MLOPS_API_KEYS"  # the gateway's client keys (comma-separated), in the auth Secret
VLLM_KEY_ENV = "MLOPS_VLLM_API_KEY"  # the key the gateway presents to vLLM, in the auth Secret
PROXY_ID_ENV = "MLOPS_PROXY_TOKEN_ID"  # a Modal Proxy Auth Token: release URLs require it
PROXY_SECRET_ENV = "MLOPS_PROXY_TOKEN_SECRET"
# + an adapter release id, in the Dict: {"base": <base key>, "sha256": <manifest digest>} while the
# release is deployed (loaded into its base's app, functions/serve.py), None once it is not
ADAPTER_KEY = "adapter:"
SERVE_BASES = "serve-bases"  # a served base on the Volume: serve-bases/<key>/{manifest.json, model/}
FAILURE_KEY = "failure:"  # + app name, in the Dict: why its server died at start (functions/serve.py)
# + "<release>@<holder>", in the Dict: {"release", "owner", "expires_at"} while a process uses the
# release (modal_inuse.py), None once it let go; one key per process, so no two overwrite each other
INUSE_KEY = "inuse:"
CLIENT_KEY_ENV = "MLOPS_API_KEY"  # the runner's gateway key (one of MLOPS_API_KEYS) by default
# The controller's config on the Volume (controller/<digest>.json: mlops.yaml as the deploying run
# read it, and the first eval suite's rows), named in its function's env at deploy
CONTROLLER_BUNDLE_ENV = "MLOPS_CONTROLLER_BUNDLE"
CONTROLLER_DIR = "controller"

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_APP_NAME = 63  # Modal's limit on App names (and a DNS label for the web URL)


def modal_name(*parts: str) -> str:
    """A valid Modal object name from `parts`; too long a name keeps its head and gets a digest."""
    cleaned = (_NAME_OK.sub("-", p).strip("-") for p in parts)
    name = "-".join(p for p in cleaned if p).lower()
    if len(name) <= _MAX_APP_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: _MAX_APP_NAME - 9].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class ModalSettings:
    """Everything `functions/*.py` and ModalBackend must agree on, derived from mlops.yaml.

    It travels to containers as JSON in `MLOPS_MODAL_SETTINGS`, because mlops.yaml is not there:
    a container re-imports its module and must build the same decorators it was deployed with.
    """

    app: str = "mlops"
    environment: str | None = None
    secrets: tuple[str, ...] = ()  # extra Modal Secrets (names) attached to every function
    served_model: str = "model"  # the deploy model's name; vLLM also answers to it
    # Several deployed models (mlops.yaml deploy.models): the ones the one gateway routes by the
    # request's `model`, each by its own routing State; () with one (the single-model layout).
    models: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()  # each of `models`' prompt template, in order (the gateway's capture)
    prompt: str = "{input}"  # how a chat turn becomes a prompt, as on the local server
    api_key_env: str | None = None  # mlops.yaml deploy.server.api_key_env: also accepted by the gateway
    train_gpu: str | None = "A10G"
    train_timeout: int = 1800
    serve_gpu: str | None = "L4"
    min_containers: int = 0
    max_containers: int = 4
    max_inputs: int = 32  # concurrent requests per vLLM container; vLLM batches them itself
    scaledown_window: int = 300  # idle seconds before a GPU container stops: scale to zero, cheaply
    startup_timeout: int = 900  # vLLM's first start loads weights and may compile kernels
    vllm_args: tuple[str, ...] = DEFAULT_OPTIONS  # mlops.yaml deploy.vllm as flags (vllm_argv.config_args)
    lora_args: tuple[str, ...] = ()  # a base app's --enable-lora flags (vllm_argv.lora_args)
    # Traffic capture by the gateway (issue 10): the registry's storage (s3://... in production;
    # a directory, made absolute, for the twin) and mlops.yaml `monitor:` as JSON ("": no capture).
    storage: str = ""
    monitor_json: str = ""
    # Your own training code (train.entrypoint): these local files go into the training image,
    # each at entrypoint_in_image(path), where functions/train.py finds it.
    train_files: tuple[str, ...] = ()

    @property
    def volume(self) -> str:
        return modal_name(self.app, "artifacts")

    @property
    def state_dict(self) -> str:
        return modal_name(self.app, "state")

    @property
    def auth_secret(self) -> str:
        return modal_name(self.app, "auth")

    @property
    def train_app(self) -> str:
        return modal_name(self.app, "train")

    @property
    def gateway_app(self) -> str:
        return modal_name(self.app, "gateway")

    def serve_app(self, release_id: str) -> str:
        return modal_name(self.app, "serve", release_id) if release_id else modal_name(self.app, "serve")

    def base_app(self, key: str) -> str:
        """The vLLM app of a base that adapter releases are loaded into (`key`: its fingerprint's head)."""
        return self.serve_app(f"base-{key[:BASE_APP_CHARS]}")

    def judge_app(self, judge: str) -> str:
        """A self-hosted judge's vLLM app (functions/serve.py with MLOPS_JUDGE set)."""
        return modal_name(self.app, "judge", judge) if judge else modal_name(self.app, "judge")

    @property
    def eval_app(self) -> str:
        return modal_name(self.app, "eval")

    @property
    def controller_app(self) -> str:
        return modal_name(self.app, "controller")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> ModalSettings:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("secrets", "train_files", "vllm_args", "lora_args", "models", "prompts"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_config(cls, cfg: Config, root: Path | None = None, model: str | None = None) -> ModalSettings:
        """`root`: the config's directory, against which a relative local `storage` resolves.
        `model`: the deployed model whose serving settings (GPU, containers, vLLM flags, prompt) a
        release app of it gets; by default the first deployed: what the shared apps (gateway, train,
        eval) are deployed with, the same whichever model's command deploys them."""
        names = cfg.deploy.names
        name = model or names[0]
        deploy = _deploy_of(cfg, name)
        entrypoints = [m.train.entrypoint for m in cfg.models.values() if m.train.entrypoint]
        storage = cfg.storage
        if "://" not in storage and root is not None:
            storage = str((root / storage).resolve())
        resources = cfg.models[name].resources
        return cls(
            app=modal_name(cfg.modal.app_name or f"mlops-{cfg.project}"),
            environment=cfg.modal.environment,
            secrets=tuple(cfg.modal.secrets),
            served_model=name,
            models=tuple(names) if len(names) > 1 else (),
            prompts=tuple(cfg.models[n].prompt for n in names) if len(names) > 1 else (),
            prompt=cfg.models[name].prompt,
            api_key_env=cfg.deploy.server.api_key_env,
            train_gpu=resources.gpu,
            train_timeout=int(resources.timeout),
            serve_gpu=deploy.resources.gpu,
            min_containers=deploy.resources.min_containers,
            max_containers=deploy.resources.max_containers,
            max_inputs=cfg.deploy.server.max_batch_size,
            vllm_args=tuple(config_args(deploy.vllm, deploy.resources.gpu)),
            lora_args=tuple(lora_args(deploy.vllm)),
            storage=storage,
            monitor_json=cfg.monitor.model_dump_json(),
            train_files=tuple(
                sorted({str(((root or Path.cwd()) / e.rpartition(":")[0]).resolve()) for e in entrypoints})
            ),
        )

    def state_keys(self, model: str | None = None) -> tuple[str, str]:
        """Where `model`'s routing State is published: its Dict key and its durable copy on the
        Volume. One deployed model keeps the single-model names ("state", routing/state.json)."""
        if not self.models or model is None:
            return STATE_KEY, STATE_FILE
        return f"{STATE_KEY}:{model}", f"routing/{model}/state.json"

    @property
    def digest(self) -> str:
        """What the gateway reports on /health: a deploy made with other settings (`modal deploy`
        by hand, with ./mlops.yaml's storage) is told apart and redeployed (ModalBackend.ensure_current)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def env(self, **extra: str) -> dict[str, str | None]:
        """The `env=` of a Modal function: these settings, plus `extra`."""
        return {SETTINGS_ENV: self.to_json(), **extra}


def _deploy_of(cfg: Config, model: str) -> DeployCfg:
    """`model`'s deploy settings: the block's defaults with its `deploy.models` entry over them."""
    if cfg.deploy.model == model or model not in cfg.deploy.models:
        return cfg.deploy
    return narrow(Loaded.model_construct(cfg=cfg, path=Path("mlops.yaml"), raw={}), model).cfg.deploy


def current_settings(environ: dict[str, str] | None = None) -> ModalSettings:
    """In a container: the settings it was deployed with. Locally: from `$MLOPS_CONFIG` (default
    ./mlops.yaml), or defaults where there is no config (so a module imports anywhere)."""
    env = os.environ if environ is None else environ
    raw = env.get(SETTINGS_ENV)
    if raw:
        return ModalSettings.from_json(raw)
    path = Path(env.get("MLOPS_CONFIG", "mlops.yaml"))
    if path.is_file():
        from mlops.config import load

        return ModalSettings.from_config(load(path, check_files=False).cfg, path.resolve().parent)
    return ModalSettings()


ENTRYPOINTS_IN_IMAGE = "/root/entrypoints"


def entrypoint_in_image(local: str) -> str:
    """Where the training image holds a local train.entrypoint file (one folder per local path, so
    two models' `train.py` do not collide)."""
    digest = hashlib.sha256(local.encode()).hexdigest()[:12]
    return f"{ENTRYPOINTS_IN_IMAGE}/{digest}/{Path(local).name}"


def files_with_sha256(root: Path) -> dict[str, str]:
    """`relative/path -> sha256` for every file under `root` (what the train function reports)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def code_digest(functions_dir: Path, settings: ModalSettings) -> str:
    """What an app deployed from `functions_dir` runs: the `mlops` package, functions/*.py and
    the settings. A deployed app whose recorded digest differs runs stale code and is redeployed."""
    import mlops

    h = hashlib.sha256(settings.to_json().encode())
    roots = [(Path(mlops.__file__).resolve().parent, "mlops"), (functions_dir.resolve(), "functions")]
    for root, label in roots:
        for p in sorted(root.rglob("*.py")):
            h.update(f"{label}/{p.relative_to(root).as_posix()}\n".encode())
            h.update(p.read_bytes())
    for f in settings.train_files:  # train.entrypoint files ride in the training image too
        p = Path(f)
        h.update(f"entrypoint/{f}\n".encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()
