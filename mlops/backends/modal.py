"""The production backend: train on a Modal GPU, serve with vLLM behind a Modal gateway.

What runs where (the names below are shared with `functions/*.py` through `ModalSettings`):

    {app}-train     functions/train.py      `train`: trains on a GPU, writes runs/<run>/ on the Volume
    {app}-eval      functions/evaluate.py   `evaluate`: scores a shard of cases (fanned out with .map())
    {app}-gateway   functions/gateway.py    `gateway`: the stable HTTPS endpoint; routes by the Dict's state
    {app}-serve-<release>  functions/serve.py  `serve`: vLLM's OpenAI server for one release
    {app}-artifacts  a Modal Volume         runs/<run>/ (training output), releases/<id>/ (what vLLM serves)
    {app}-state      a Modal Dict           "state": the routing State; "url:<release>": its vLLM URL
    {app}-auth       a Modal Secret (yours)  MLOPS_API_KEYS (gateway keys, comma-separated) and
                                            MLOPS_VLLM_API_KEY (the key the gateway presents to vLLM)

The registry (a local directory or S3) stays the source of truth, on the client: a trained model is
downloaded from the Volume (sha256-checked) and published from here, exactly as on the local backend;
a release is copied into the Volume, with its manifest, before it is served, and the vLLM container
checks every file against that manifest (and the manifest against the digest given at deploy) first.

`modal` is imported inside methods only: `mlops validate` and `--help` never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mlops.backends.base import Backend
from mlops.config import Config
from mlops.errors import ConfigError, InfraError, IntegrityError
from mlops.registry.releases import State, sha256_file
from mlops.training.train import Progress, TrainJob, TrainResult

SETTINGS_ENV = "MLOPS_MODAL_SETTINGS"  # JSON of ModalSettings, set on every function's container
VOLUME_MOUNT = "/vol"
STATE_KEY = "state"
VLLM_PORT = 8000
DEPLOY_TIMEOUT_S = 40 * 60  # building the vLLM image the first time takes 10-20 minutes
HEALTH_POLL_S = 5.0

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
    eval_timeout: int = 900

    # ------------------------------------------------------------------ names

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
    def eval_app(self) -> str:
        return modal_name(self.app, "eval")

    @property
    def gateway_app(self) -> str:
        return modal_name(self.app, "gateway")

    def serve_app(self, release_id: str) -> str:
        return modal_name(self.app, "serve", release_id) if release_id else modal_name(self.app, "serve")

    # ------------------------------------------------------------------ transport

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> ModalSettings:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "secrets" in data:
            data["secrets"] = tuple(data["secrets"])
        return cls(**data)

    @classmethod
    def from_config(cls, cfg: Config) -> ModalSettings:
        model = cfg.models[cfg.deploy.model]
        return cls(
            app=modal_name(cfg.modal.app_name or f"mlops-{cfg.project}"),
            environment=cfg.modal.environment,
            secrets=tuple(cfg.modal.secrets),
            served_model=cfg.deploy.model,
            prompt=model.prompt,
            api_key_env=cfg.deploy.server.api_key_env,
            train_gpu=model.resources.gpu,
            train_timeout=int(model.resources.timeout),
            serve_gpu=cfg.deploy.resources.gpu,
            min_containers=cfg.deploy.resources.min_containers,
            max_containers=cfg.deploy.resources.max_containers,
            max_inputs=cfg.deploy.server.max_batch_size,
        )

    def env(self, **extra: str) -> dict[str, str | None]:
        """The `env=` of a Modal function: these settings, plus `extra`."""
        return {SETTINGS_ENV: self.to_json(), **extra}


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

        return ModalSettings.from_config(load(path, check_files=False).cfg)
    return ModalSettings()


# ---------------------------------------------------------------------------- errors


@contextlib.contextmanager
def modal_errors(what: str, deploy: str | None = None) -> Iterator[None]:
    """Modal's exceptions -> one-line InfraError (exit 4) that says what to run."""
    mx = _modal().exception
    try:
        yield
    except mx.AuthError as e:
        raise InfraError(
            f"{what}: Modal is not authenticated ({_first_line(e)}); run `modal token new` "
            "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
        ) from e
    except mx.NotFoundError as e:
        hint = f"; run `{deploy}`" if deploy else ""
        raise InfraError(f"{what}: not found on Modal ({_first_line(e)}){hint}") from e
    except mx.Error as e:
        raise InfraError(f"{what}: Modal {type(e).__name__}: {_first_line(e)}") from e


def _modal() -> Any:
    """The modal SDK, imported on first use (never at import of mlops)."""
    try:
        import modal
    except ImportError as e:
        raise ConfigError("backend: modal needs the Modal SDK: pip install 'mlops[cloud]'") from e
    return modal


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _run_cli(cmd: Sequence[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the `modal` CLI (a seam: tests replace it with a recorder)."""
    return subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------------------- the backend


@dataclass
class _Remote:
    """What `functions/train.py:train` returns, split into the TrainResult and where the files are."""

    result: TrainResult
    volume_dir: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, out: dict[str, Any]) -> _Remote:
        names = {f.name for f in fields(TrainResult)}
        try:
            result = TrainResult(**{k: out[k] for k in names})
            return cls(result, str(out["volume_dir"]), dict(out["files"]))
        except (KeyError, TypeError) as e:
            raise InfraError(f"the Modal train function returned an unexpected result: {e}") from e


class ModalBackend(Backend):
    name: ClassVar[str] = "modal"

    @property
    def settings(self) -> ModalSettings:
        return ModalSettings.from_config(self.cfg)

    def _function(self, app: str, name: str) -> Any:
        return _modal().Function.from_name(app, name, environment_name=self.settings.environment)

    def _dict(self) -> Any:
        s = self.settings
        return _modal().Dict.from_name(s.state_dict, environment_name=s.environment, create_if_missing=True)

    def _volume(self) -> Any:
        s = self.settings
        return _modal().Volume.from_name(s.volume, environment_name=s.environment, create_if_missing=True)

    # ------------------------------------------------------------------ train

    def _train(self, job: TrainJob, progress: Progress | None) -> TrainResult:
        s = self.settings
        res = self.cfg.models[job.model_name].resources if job.model_name in self.cfg.models else None
        # Per-model resources ride on with_options: one deployed function serves every model.
        options: dict[str, Any] = {}
        if res is not None:
            options = {"gpu": res.gpu, "timeout": int(res.timeout), "cpu": res.cpu, "memory": res.memory}
            options = {k: v for k, v in options.items() if v is not None}
        dataset = Path(job.dataset_path)
        if not dataset.is_file():
            raise ConfigError(f"dataset {dataset} does not exist")
        run_id = f"{job.model_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        with modal_errors(f"train {job.model_name} on Modal", deploy="modal deploy functions/train.py"):
            fn = self._function(s.train_app, "train")
            if options:
                fn = fn.with_options(**options)
            # The dataset travels with the call (Modal moves large arguments as blobs); the container
            # has no copy of the repository.
            out = fn.remote(asdict(job), dataset.read_bytes(), run_id)
        remote = _Remote.parse(out)
        self._download(remote, Path(job.out_dir))
        if progress is not None:
            progress(
                {
                    "step": float(remote.result.steps),
                    "loss": remote.result.final_loss,
                    "tokens_per_s": remote.result.tokens_per_s,
                }
            )
        remote.result.out_dir = job.out_dir
        return remote.result

    def _download(self, remote: _Remote, dest: Path) -> None:
        """Copy runs/<run>/ from the Volume to `dest`, checking each file against its sha256."""
        dest.mkdir(parents=True, exist_ok=True)
        with modal_errors("download the trained model from the Modal Volume"):
            vol = self._volume()
            for rel, want in sorted(remote.files.items()):
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise IntegrityError(f"the Modal train function returned an unsafe path {rel!r}")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with target.open("wb") as f:
                    for chunk in vol.read_file(f"{remote.volume_dir}/{rel}"):
                        h.update(chunk)
                        f.write(chunk)
                if h.hexdigest() != want:
                    target.unlink()
                    raise IntegrityError(f"{rel} downloaded from the Modal Volume does not match its sha256")

    # ------------------------------------------------------------------ serve / route

    @contextlib.contextmanager
    def _serve(self) -> Iterator[str]:
        state, _ = self.registry.read_state()
        self._publish(state)  # the gateway routes by what the registry says, starting now
        url = self._gateway_url()
        yield url  # serverless: nothing to stop when the caller is done

    def _gateway_url(self) -> str:
        s = self.settings
        with modal_errors("find the gateway", deploy="modal deploy functions/gateway.py"):
            url = self._function(s.gateway_app, "gateway").get_web_url()
        if not url:
            raise InfraError(f"{s.gateway_app}/gateway has no web URL; run `modal deploy functions/gateway.py`")
        return str(url).rstrip("/")

    def _endpoint(self) -> str | None:
        return self._gateway_url()

    def _publish(self, state: State) -> None:
        with modal_errors("publish the routing state to the Modal Dict"):
            self._dict()[STATE_KEY] = state.to_json()

    def _prepare(self, release_id: str) -> None:
        self.preflight(release_id)  # a release is evaluated through its own vLLM app, so deploy it first

    def _preflight(self, release_id: str) -> None:
        """Stage the release on the Volume, deploy its vLLM app, record its URL, wait for /health."""
        s = self.settings
        manifest = self.registry.require(release_id)
        self._stage(release_id, manifest)
        self._deploy_serve(release_id, str(manifest["artifact"]["sha256"]))
        with modal_errors(f"find the vLLM server of {release_id}", deploy="mlops deploy"):
            url = self._function(s.serve_app(release_id), "serve").get_web_url()
        if not url:
            raise InfraError(f"{s.serve_app(release_id)}/serve has no web URL")
        url = str(url).rstrip("/")
        with modal_errors("record the release URL in the Modal Dict"):
            self._dict()[f"url:{release_id}"] = url
        self._wait_healthy(release_id, url, timeout=float(s.startup_timeout + 60))

    def _stage(self, release_id: str, manifest: dict[str, Any]) -> None:
        src = self.registry.artifact_dir(release_id)  # verified (and downloaded, for S3) first
        staged = {"id": release_id, "artifact": manifest["artifact"]}
        with modal_errors(f"copy {release_id} to the Modal Volume"):
            vol = self._volume()
            with vol.batch_upload(force=True) as batch:
                batch.put_directory(str(src), f"/releases/{release_id}/model")
                batch.put_file(
                    io.BytesIO(json.dumps(staged, sort_keys=True).encode()),
                    f"/releases/{release_id}/manifest.json",
                )

    def _deploy_serve(self, release_id: str, sha256: str) -> None:
        s = self.settings
        script = self.loaded.root / "functions" / "serve.py"
        cmd = [sys.executable, "-m", "modal", "deploy", str(script), "--name", s.serve_app(release_id)]
        if s.environment:
            cmd += ["--env", s.environment]
        env = dict(os.environ) | {
            SETTINGS_ENV: s.to_json(),
            "MLOPS_RELEASE": release_id,
            "MLOPS_RELEASE_SHA256": sha256,
        }
        try:
            proc = _run_cli(cmd, env, self.loaded.root, DEPLOY_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InfraError(f"deploy {s.serve_app(release_id)}: {type(e).__name__}: {e}") from e
        if proc.returncode != 0:
            tail = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = tail[-1].strip()[:300] if tail else f"exit {proc.returncode}"
            hint = " (run `modal token new`)" if "token" in why.lower() or "auth" in why.lower() else ""
            raise InfraError(f"`modal deploy functions/serve.py` for {release_id} failed: {why}{hint}")

    def _wait_healthy(self, release_id: str, url: str, timeout: float) -> None:
        """vLLM answers /health without a key once the model is loaded (a cold start may take minutes)."""
        import httpx

        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                r = httpx.get(f"{url}/health", timeout=30.0, follow_redirects=True)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            if time.monotonic() >= deadline:
                raise InfraError(f"the vLLM server of {release_id} did not become healthy in {timeout:.0f}s ({last})")
            time.sleep(HEALTH_POLL_S)

    # ------------------------------------------------------------------ evaluation fan-out

    def score_cases(
        self,
        metrics: list[Any],
        cases: list[dict[str, Any]],
        outputs: list[dict[str, Any]],
        shard_size: int = 64,
    ) -> dict[str, Any]:
        """Score cases remotely: one `evaluate` call per shard, fanned out with `.map()`, merged in order."""
        shards = make_shards(metrics, cases, outputs, shard_size)
        if not shards:
            return {"scores": {}, "higher_is_better": {}}
        with modal_errors("score on Modal", deploy="modal deploy functions/evaluate.py"):
            fn = self._function(self.settings.eval_app, "evaluate")
            parts = list(fn.map(shards))
        return merge_shards(parts)


def make_shards(
    metrics: list[Any], cases: list[dict[str, Any]], outputs: list[dict[str, Any]], shard_size: int
) -> list[dict[str, Any]]:
    if len(cases) != len(outputs):
        raise ValueError("cases and outputs differ in length")
    size = max(1, shard_size)
    return [
        {"metrics": metrics, "cases": cases[i : i + size], "outputs": outputs[i : i + size]}
        for i in range(0, len(cases), size)
    ]


def merge_shards(parts: list[dict[str, Any]]) -> dict[str, Any]:
    scores: dict[str, list[dict[str, Any]]] = {}
    better: dict[str, bool] = {}
    for part in parts:
        for name, rows in part["scores"].items():
            scores.setdefault(name, []).extend(rows)
        better.update(part["higher_is_better"])
    return {"scores": scores, "higher_is_better": better}


def files_with_sha256(root: Path) -> dict[str, str]:
    """`relative/path -> sha256` for every file under `root` (what the train function reports)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
