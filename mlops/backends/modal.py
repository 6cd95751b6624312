"""The production backend: train on a Modal GPU, serve with vLLM behind a Modal gateway.

The names of every app, the Volume, the Dict and the Secret are in `modal_settings.py`; Modal itself
is behind `modal_api.ModalAPI` (the SDK, or the local twin with MLOPS_MODAL_TWIN=DIR).

The registry (a local directory or S3) stays the source of truth, on the client: a trained model is
downloaded from the Volume (sha256-checked) and published from here, exactly as on the local backend;
a release is copied into the Volume, with its manifest, before it is served, and the vLLM container
checks every file against that manifest (and the manifest against the digest given at deploy) first.

The train and gateway apps are redeployed whenever the code they would run (the `mlops` package,
functions/*.py, the settings) differs from what they were deployed with, so a push that changes the
training code trains with that code. This machine reaches a release only through the gateway
(per-release URLs require a Modal Proxy Auth Token that only the gateway holds).

Several deployed models share the train, eval and gateway apps (deployed with the whole file's
settings, whichever model's command deploys them); each model's routing State is published under
its own Dict key and Volume file (`ModalSettings.state_keys`), so moving one never rewrites
another's, and the gateway routes each request by its `model` to that model's State. A release app
is deployed with its model's own serving settings (GPU, containers, vLLM flags, prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mlops.backends.base import Backend
from mlops.backends.modal_adapters import deploy_adapter, keep_bases
from mlops.backends.modal_api import ModalAPI, open_api
from mlops.backends.modal_controller import ensure_controller
from mlops.backends.modal_inuse import Marks, live_releases
from mlops.backends.modal_settings import (
    BASES,
    CLIENT_KEY_ENV,
    SETTINGS_ENV,
    ModalSettings,
    code_digest,
)
from mlops.config import Config, Loaded
from mlops.data import read_source, to_jsonl
from mlops.errors import ConfigError, InfraError, IntegrityError
from mlops.registry.releases import Registry, State
from mlops.training.train import Progress, TrainJob, TrainResult

HEALTH_POLL_S = 2.0
LIVE_WAIT_S = 60.0  # the gateway re-reads the state every STATE_TTL_S (2 s); a cold one starts first


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
    _api: ModalAPI | None = None

    def __init__(self, loaded: Loaded, registry: Registry) -> None:
        super().__init__(loaded, registry)
        self._current: set[tuple[str, str]] = set()  # (app, digest) found or made current: one check each
        self._file_cfg: Config | None = None
        # releases this backend deployed or woke to use (an eval, a rollout): their apps stay up
        # while it runs, though the state does not reference them yet (every lease heartbeat
        # publishes, and would stop them); marked in the Dict too, for the cleanups of other
        # processes (the scheduled controller's, the next command's): modal_inuse.py
        self._in_use: set[str] = set()
        self._marks = Marks(lambda: self.api)

    @property
    def file_cfg(self) -> Config:
        """The whole file's config: a session sees its model's view (`mlops.config.narrow`), but
        the shared apps must be deployed with the same settings whichever model deploys them, or
        each model's run would redeploy the gateway for the other's."""
        if self._file_cfg is None:
            deploy = self.loaded.raw.get("deploy")
            several = isinstance(deploy, dict) and bool(deploy.get("models"))
            self._file_cfg = Config.model_validate(self.loaded.raw) if several else self.cfg
        return self._file_cfg

    @property
    def model(self) -> str:
        return self.registry.model or self.cfg.deploy.model

    @property
    def settings(self) -> ModalSettings:
        """What the shared apps (gateway, train, eval) run with."""
        return ModalSettings.from_config(self.file_cfg, self.loaded.root)

    @property
    def serve_settings(self) -> ModalSettings:
        """What this model's release apps run with (its GPU, containers, vLLM flags, prompt)."""
        return ModalSettings.from_config(self.file_cfg, self.loaded.root, model=self.model)

    @property
    def api(self) -> ModalAPI:
        if self._api is None:
            self._api = open_api(self.settings)
        return self._api

    @property
    def functions_dir(self) -> Path:
        return self.loaded.root / "functions"

    def ensure_current(self, script: str, app: str) -> None:
        """Deploy `functions/<script>` as `app` unless it is deployed with the code it would run now."""
        s = self.settings
        path = self.functions_dir / script
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: backend: modal deploys the apps in functions/")
        digest = code_digest(self.functions_dir, s)
        if (app, digest) in self._current or (
            self.api.dict_get(f"code:{app}") == digest and app in self.api.deployed() and self._runs_settings(app)
        ):
            self._current.add((app, digest))
            return
        self.api.deploy(path, app, {SETTINGS_ENV: s.to_json()})
        self.api.dict_put(f"code:{app}", digest)
        self._current.add((app, digest))

    def _runs_settings(self, app: str) -> bool:
        """The gateway says which settings it runs with (/health): one deployed by hand with
        other settings (say ./mlops.yaml's storage rather than the run's) is not current, though
        the Dict still holds the digest of the last deploy made here."""
        if app != self.settings.gateway_app:
            return True
        import httpx

        url = self.api.web_url(app, "gateway")
        try:
            r = httpx.get(f"{url}/health", timeout=60.0, follow_redirects=True, trust_env=False)
            return bool(url) and r.json().get("settings") == self.settings.digest
        except (httpx.HTTPError, ValueError, AttributeError):
            return False  # not answering as deployed: a redeploy is the repair

    def client_key(self) -> str | None:
        """One of the gateway's keys: from `deploy.server.api_key_env` if set, else $MLOPS_API_KEY."""
        env = self.cfg.deploy.server.api_key_env or CLIENT_KEY_ENV
        key = os.environ.get(env, "").strip()
        if not key:
            raise ConfigError(
                f"backend: modal needs a gateway key in ${env} (one of MLOPS_API_KEYS in the Modal Secret "
                f"{self.settings.auth_secret!r})"
            )
        return key

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
        if dataset.is_file() and dataset.suffix.lower() == ".jsonl":
            data = dataset.read_bytes()
        elif job.dataset_path.startswith("hf:") or dataset.exists():
            # Parquet, CSV, a save_to_disk directory or hf: become JSONL rows of their own format,
            # which the container reads with the default fields.
            rows = read_source(job.dataset_path, job.dataset_format, job.input_field, job.target_field)
            data = to_jsonl(rows)
            fields = {"dataset_format": rows[0].format, "input_field": "input", "target_field": "expected"}
            job = job.model_copy(update=fields)
        else:
            raise ConfigError(f"dataset {dataset} does not exist")
        job = self._ship_base(job)
        run_id = f"{job.model_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        self.ensure_current("train.py", s.train_app)
        # The dataset travels with the call (Modal moves large arguments as blobs); the container
        # has no copy of the repository.
        out = self.api.call(s.train_app, "train", job.model_dump(), data, run_id, options=options)
        remote = _Remote.parse(out)
        self._download(remote, Path(job.out_dir))
        if progress is not None:
            r = remote.result
            progress({"step": float(r.steps), "loss": r.final_loss, "tokens_per_s": r.tokens_per_s})
        remote.result.out_dir = job.out_dir
        return remote.result

    def _ship_base(self, job: TrainJob) -> TrainJob:
        """A local `base:` directory exists only on this machine: copy it to the Volume once, under
        bases/<its fingerprint>/ (`<fingerprint>.complete` written last), and train from there."""
        from mlops.training.offline_base import fingerprint

        if job.base == "scratch" or not Path(job.base).is_dir():
            return job  # a hub id: the container downloads it (HF_TOKEN from a Secret)
        src = Path(job.base)
        rel = f"{BASES}/{fingerprint(src)[:32]}"
        try:
            for _ in self.api.volume_read(f"{rel}.complete"):
                pass
        except FileNotFoundError:
            files: dict[str, Path | bytes] = {
                f"{rel}/{p.relative_to(src).as_posix()}": p for p in sorted(src.rglob("*")) if p.is_file()
            }
            self.api.volume_put(files)
            self.api.volume_put({f"{rel}.complete": b"ok"})  # beside the directory: not in its fingerprint
        return job.model_copy(update={"base": rel})

    def _download(self, remote: _Remote, dest: Path) -> None:
        """Copy runs/<run>/ from the Volume to `dest`, checking each file against its sha256."""
        dest.mkdir(parents=True, exist_ok=True)
        for rel, want in sorted(remote.files.items()):
            if rel.startswith("/") or ".." in rel.split("/"):
                raise IntegrityError(f"the Modal train function returned an unsafe path {rel!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with target.open("wb") as f:
                for chunk in self.api.volume_read(f"{remote.volume_dir}/{rel}"):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != want:
                target.unlink()
                raise IntegrityError(f"{rel} downloaded from the Modal Volume does not match its sha256")

    # ------------------------------------------------------------------ serve / route

    @contextlib.contextmanager
    def _serve(self) -> Iterator[str]:
        # Publishing is set_state's job alone: a PR's eval must not put its registry's routing live.
        url = self._gateway_url()
        prod = self.registry.read_state()[0].stages.get("production")
        if prod:  # scaled to zero: wake production before smoke requests and its evals hit it cold
            self._wait_healthy(url, prod, float(self.settings.startup_timeout + 60))
        yield url  # serverless: nothing to stop when the caller is done

    def _gateway_url(self) -> str:
        s = self.settings
        self.ensure_current("gateway.py", s.gateway_app)
        ensure_controller(self)  # what advances a rollout once the job returned (modal_controller.py)
        url = self.api.web_url(s.gateway_app, "gateway")
        if not url:
            raise InfraError(f"{s.gateway_app}/gateway has no web URL; run `modal deploy functions/gateway.py`")
        return url

    def _endpoint(self) -> str | None:
        return self._gateway_url()

    def require_controller(self) -> None:
        ensure_controller(self, required=True)

    def _publish(self, state: State) -> None:
        raw = state.to_json()
        key, path = self.settings.state_keys(self.model)
        # The Volume copy outlives Dict expiry (7 idle days); the gateway falls back to it.
        self.api.volume_put({path: json.dumps(raw, sort_keys=True).encode()})
        self.api.dict_put(key, raw)
        self._await_live(state.version)
        self.stop_unreferenced(state)

    def _await_live(self, version: int) -> None:
        """Return once the gateway routes by `version` (it caches the Dict for a moment), so the
        next request (a smoke test, a canary step) already sees the move, as on the local server."""
        import httpx

        url = self.api.web_url(self.settings.gateway_app, "gateway")
        if not url:
            return  # no gateway yet: it will read this state when it starts
        deadline = time.monotonic() + LIVE_WAIT_S
        seen = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(
                    f"{url}/v1/mlops/stats",
                    params={"since": time.time(), "model": self.model},
                    headers={"authorization": f"Bearer {self.client_key()}"},
                    timeout=30.0,
                    trust_env=False,
                )
                seen = r.json().get("state_version") if r.status_code == 200 else f"HTTP {r.status_code}"
                if isinstance(seen, int) and seen >= version:
                    return
            except (httpx.HTTPError, ValueError) as e:
                seen = type(e).__name__
            time.sleep(0.25)
        raise InfraError(f"the gateway did not pick up routing state v{version} in {LIVE_WAIT_S:.0f}s ({seen})")

    def remote_scoring(self) -> Any:
        """Self-hosted judges deployed (or stopped), heavy metrics mapped over `{app}-eval`."""
        from mlops.backends.modal_eval import remote_scoring

        return remote_scoring(self)

    def stop_unreferenced(self, state: State) -> list[str]:
        """Stop every release app the state no longer routes to or keeps (production, previous,
        canary): with min_containers > 0 each would keep a GPU warm for nothing; and every judge
        app mlops.yaml no longer declares. A release some live process uses (an eval running
        elsewhere) is kept: its mark in the Dict (modal_inuse.py) says so."""
        s = self.settings
        refs = state.referenced() | self._neighbours_referenced() | self._in_use | live_releases(self.api)
        keep = {s.serve_app(r) for r in refs} | keep_bases(self, refs)
        keep |= {s.judge_app(n) for n, j in self.cfg.judges.items() if j.self_hosted}
        prefix = s.serve_app("") + "-"
        judges = s.judge_app("") + "-"
        stopped = sorted(a for a in self.api.deployed() if a.startswith((prefix, judges)) and a not in keep)
        for app in stopped:
            self.api.stop(app)
        return stopped

    def _neighbours_referenced(self) -> set[str]:
        """The releases the other deployed models route to or keep: their apps share the prefix."""
        if not self.settings.models:
            return set()
        doc, _ = self.registry.read_doc()
        refs = {r for m, st in doc.states.items() if m != self.model for r in st.referenced()}
        if doc.legacy is not None and doc.owner not in (None, self.model):  # the single-model layout, not ours
            refs |= doc.legacy.referenced()
        return refs

    def _prepare(self, release_id: str) -> None:
        self.preflight(release_id)  # a release is evaluated through its own vLLM app, so deploy it first

    def _preflight(self, release_id: str) -> None:
        """Stage the release on the Volume and deploy its vLLM app, unless it is up; wait for /health."""
        s = self.settings
        self.hold(release_id)
        adapter = (self.registry.manifest(release_id) or {}).get("adapter")
        if isinstance(adapter, dict):  # no app of its own: loaded into its base's app (modal_adapters.py)
            deploy_adapter(self, release_id, self.registry.require(release_id))
            return
        app = s.serve_app(release_id)
        url = self._gateway_url()
        # e.g. a rollback to `previous`: a deployed app is woken (scaled to zero, its first request
        # waits for a cold start), not redeployed; only one that does not answer is redeployed
        if app in self.api.deployed() and self._healthy(url, release_id, float(s.startup_timeout + 60)):
            return
        manifest = self.registry.require(release_id)
        self._stage(release_id, manifest)
        env = {SETTINGS_ENV: self.serve_settings.to_json(), "MLOPS_RELEASE": release_id}
        self.api.deploy(self.functions_dir / "serve.py", app, env | {"MLOPS_RELEASE_SHA256": manifest_sha(manifest)})
        self._wait_healthy(url, release_id, float(s.startup_timeout + 60))

    def hold(self, release_id: str) -> None:
        """Keep the release's app (or its base's) up while this process uses it, whoever cleans up."""
        self._in_use.add(release_id)
        self._marks.hold(release_id)

    def close(self) -> None:
        self._marks.close()

    def _stage(self, release_id: str, manifest: dict[str, Any]) -> None:
        src = self.registry.artifact_dir(release_id)  # verified (and downloaded, for S3) first
        staged = {"id": release_id, "artifact": manifest["artifact"]}
        files: dict[str, Path | bytes] = {
            f"releases/{release_id}/model/{p.relative_to(src).as_posix()}": p
            for p in sorted(src.rglob("*"))
            if p.is_file()
        }
        files[f"releases/{release_id}/manifest.json"] = json.dumps(staged, sort_keys=True).encode()
        self.api.volume_put(files)

    def _healthy(self, url: str, release_id: str, timeout: float) -> bool:
        import httpx

        try:
            r = httpx.get(
                f"{url}/v1/mlops/releases/{release_id}/health",
                headers={"authorization": f"Bearer {self.client_key()}"},
                timeout=timeout,
                follow_redirects=True,
                trust_env=False,
            )
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _wait_healthy(self, url: str, release_id: str, timeout: float, app: str | None = None) -> None:
        """Poll the release's /health through the gateway; a cold vLLM start may take minutes, a
        server that died at start fails at once with the end of its log. `app`: the one serving it."""
        app = app or self.settings.serve_app(release_id)
        deadline = time.monotonic() + timeout
        while not self._healthy(url, release_id, min(60.0, timeout)):
            failure = self.api.failure(app)
            if failure:
                with contextlib.suppress(InfraError):  # else Modal restarts its GPU container again and again
                    self.api.stop(app)
                raise InfraError(f"the vLLM server of {release_id} failed to start: {failure}")
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"the vLLM server of {release_id} did not become healthy in {timeout:.0f}s "
                    f"(see `modal app logs {app}`)"
                )
            time.sleep(HEALTH_POLL_S)


def manifest_sha(manifest: dict[str, Any]) -> str:
    return str(manifest["artifact"]["sha256"])
