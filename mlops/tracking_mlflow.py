"""MLflow beside W&B (`tracking.mlflow`): runs with params, loss curves, eval metrics and the report,
and every release as a version of one registered model whose aliases follow mlops's registry.

We speak MLflow's REST API with httpx (already a dependency) instead of importing the `mlflow`
client: the full package would downgrade pyarrow and cryptography in this environment, and even
mlflow-skinny adds fastapi, databricks-sdk and more to every install for the dozen calls we make
(README, "MLflow"). The server itself runs wherever you like (tests: `.venv-mlflow`, built by
`make install-mlflow`).

mlops's registry is the source of truth. MLflow only mirrors it, so MLflow being down never fails a
run: each call is retried (3 tries), then the server is marked down for this process (no further
calls wait on it), a warning is logged once and kept in `warnings()` for the run's result. The
aliases are re-derived from the registry's whole state on every stage change, so a mirror that
missed a change while down is put right by the next one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from mlops.config import Loaded, MlflowCfg
from mlops.redact import redact

log = logging.getLogger("mlops.tracking")
ALIASES = ("production", "previous", "candidate")  # the registry's stage pointers, as MLflow aliases
RELEASE_TAG = "mlops.release"
TRIES = 3
_lock = threading.Lock()
_down: dict[str, str] = {}  # tracking_uri -> why: not called again by this process
_warnings: list[str] = []
_active_run: dict[str, dict[str, Any]] = {}  # tracking_uri -> the run this process logs (it trains the candidate)


class Unavailable(Exception):
    """The server did not answer (after retries), or refused a call; already logged."""


def warnings() -> list[str]:
    """What went wrong with MLflow in this process, one line each (the run reports them)."""
    with _lock:
        return list(_warnings)


def warn(msg: str) -> None:
    with _lock:
        if msg in _warnings:
            return
        _warnings.append(msg)
    log.warning("%s", msg)


def reset() -> None:
    """Forget servers marked down and past warnings (a new run in a long-lived process, tests)."""
    with _lock:
        _down.clear()
        _warnings.clear()


class Client:
    """The few REST calls we need, each bounded by `timeout` and retried; see the module doc."""

    def __init__(self, cfg: MlflowCfg) -> None:
        self.uri = cfg.tracking_uri.rstrip("/")
        self.timeout = cfg.timeout
        token = os.environ.get(cfg.token_env) if cfg.token_env else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
        """`/api/2.0/mlflow/<path>`; a 4xx is returned as {"error_code": ...}, not retried."""
        return self._request(method, f"{self.uri}/api/2.0/mlflow/{path}", json=body, params=params or None)

    def put_artifact(self, run: dict[str, Any], name: str, data: bytes) -> None:
        """Upload through the server's artifact proxy (`mlflow server` serves artifacts by default)."""
        root = str(run["info"]["artifact_uri"])
        if not root.startswith("mlflow-artifacts:/"):
            raise Unavailable(f"MLflow: artifact store {root.split(':')[0]!r} is not proxied by the server")
        rel = root.removeprefix("mlflow-artifacts:/").lstrip("/")
        self._request("PUT", f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{rel}/{name}", content=data)

    def _request(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        with _lock:
            why = _down.get(self.uri)
        if why is not None:
            raise Unavailable(why)
        err = ""
        for attempt in range(TRIES):
            try:
                r = httpx.request(method, url, headers=self.headers, timeout=self.timeout, **kw)
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 500:
                    doc = r.json() if r.content and "json" in r.headers.get("content-type", "") else {}
                    if r.status_code >= 400 and not doc.get("error_code"):
                        doc = {"error_code": f"HTTP {r.status_code}", "message": r.text[:200]}
                    return dict(doc)
                err = f"HTTP {r.status_code}"
            if attempt < TRIES - 1:
                time.sleep(0.3 * (attempt + 1))  # a restarting server; bounded: ~1 s in all
        why = redact(f"MLflow at {self.uri} unavailable ({err}; {TRIES} tries): not logged there, the run goes on")
        with _lock:
            _down[self.uri] = why
        warn(why)
        raise Unavailable(why)

    def ok(self, doc: dict[str, Any], what: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        code = doc.get("error_code")
        if code and code not in allowed:
            raise Unavailable(redact(f"MLflow refused {what}: {code} {str(doc.get('message', ''))[:160]}"))
        return doc


class MlflowRun:
    """One MLflow run for one mlops run (`Tracker` fans out to it); every method is safe to call
    when MLflow is down: it logs nothing and returns."""

    def __init__(self, loaded: Loaded, cfg: MlflowCfg, job_type: str, params: dict[str, Any]) -> None:
        self.client = Client(cfg)
        self.run: dict[str, Any] | None = None
        self._metrics: list[dict[str, Any]] = []
        self._safe(lambda: self._start(experiment_name(loaded), job_type, params), "starting a run")

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else str(self.run["info"]["run_id"])

    def _safe(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Unavailable as e:
            if "unavailable" not in str(e):  # a down server was already reported
                warn(f"{e} ({what})")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # a reply we cannot read
            warn(redact(f"MLflow: {what} failed: {type(e).__name__}: {str(e)[:160]}"))
        return None

    def _start(self, experiment: str, job_type: str, params: dict[str, Any]) -> None:
        c = self.client
        tags = {"mlops.job_type": job_type}
        self.run = start_run(c, experiment_id(c, experiment), f"{job_type}-{_stamp()}", tags)
        with _lock:
            _active_run[c.uri] = self.run
        self.params(params)

    def params(self, params: dict[str, Any]) -> None:
        if self.run is None or not params:
            return
        items = [{"key": str(k)[:250], "value": str(v)[:6000]} for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            body = {"run_id": self.run_id, "params": items[i : i + 100]}
            self._safe(
                lambda b=body: self.client.ok(self.client.call("POST", "runs/log-batch", b), "logging params"),
                "logging params",
            )

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        """Buffered: sent 500 at a time and at `finish` (a loss curve is one call, not one per point)."""
        if self.run is None:
            return
        now = _ms()
        for k, v in data.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            self._metrics.append({"key": k, "value": float(v), "timestamp": now, "step": int(step or 0)})
        if len(self._metrics) >= 500:
            self.flush()

    def flush(self) -> None:
        batch, self._metrics = self._metrics, []
        if self.run is None or not batch:
            return
        body = {"run_id": self.run_id, "metrics": batch}
        self._safe(
            lambda: self.client.ok(self.client.call("POST", "runs/log-batch", body), "logging metrics"),
            "logging metrics",
        )

    def tags(self, tags: dict[str, Any]) -> None:
        if self.run is None or not tags:
            return
        body = {"run_id": self.run_id, "tags": [{"key": str(k), "value": str(v)[:5000]} for k, v in tags.items()]}
        self._safe(
            lambda: self.client.ok(self.client.call("POST", "runs/log-batch", body), "setting tags"), "setting tags"
        )

    def artifact(self, name: str, data: bytes) -> None:
        if self.run is not None:
            run = self.run
            self._safe(lambda: self.client.put_artifact(run, name, data), f"uploading {name}")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        self.flush()
        body = {"run_id": self.run_id, "status": "FINISHED" if exit_code == 0 else "FAILED", "end_time": _ms()}
        self._safe(
            lambda: self.client.ok(self.client.call("POST", "runs/update", body), "ending the run"), "ending the run"
        )
        with _lock:
            if _active_run.get(self.client.uri) is self.run:
                _active_run.pop(self.client.uri)
        self.run = None


def experiment_name(loaded: Loaded) -> str:
    cfg = loaded.cfg.tracking.mlflow
    return cfg.experiment if cfg and cfg.experiment else loaded.cfg.project


def experiment_id(c: Client, name: str) -> str:
    got = c.call("GET", "experiments/get-by-name", experiment_name=name)
    if got.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
        return str(
            c.ok(c.call("POST", "experiments/create", {"name": name}), "creating the experiment")["experiment_id"]
        )
    return str(c.ok(got, "reading the experiment")["experiment"]["experiment_id"])


def start_run(c: Client, exp_id: str, name: str, tags: dict[str, str]) -> dict[str, Any]:
    body = {
        "experiment_id": exp_id,
        "start_time": _ms(),
        "run_name": name,
        "tags": [{"key": k, "value": v} for k, v in tags.items()],
    }
    return dict(c.ok(c.call("POST", "runs/create", body), "creating a run")["run"])


def model_name(loaded: Loaded, model: str) -> str:
    cfg = loaded.cfg.tracking.mlflow
    return (cfg.model_name if cfg and cfg.model_name else f"{loaded.cfg.project}-{model}").replace("/", "-")


def sync_aliases(loaded: Loaded, registry: Any, stages: dict[str, str | None], model: str) -> dict[str, str | None]:
    """Make the registered model's aliases what the registry's stages are: each release a stage
    points at registered as a version (once), `production`/`previous`/`candidate` moved onto it,
    an alias whose stage is empty removed. Returns alias -> version ({} when MLflow is off or down)."""
    cfg = loaded.cfg.tracking.mlflow
    if cfg is None:
        return {}
    c = Client(cfg)
    name = model_name(loaded, model)
    try:
        return _sync(c, registry, name, stages, lambda: experiment_id(c, experiment_name(loaded)))
    except Unavailable as e:
        if "unavailable" not in str(e):
            warn(f"{e} (moving the aliases of {name})")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        warn(redact(f"MLflow: moving the aliases of {name} failed: {type(e).__name__}: {str(e)[:160]}"))
    return {}


def _sync(
    c: Client, registry: Any, name: str, stages: dict[str, str | None], exp: Callable[[], str]
) -> dict[str, str | None]:
    c.ok(c.call("POST", "registered-models/create", {"name": name}), "creating the model", ("RESOURCE_ALREADY_EXISTS",))
    found = c.ok(c.call("GET", "model-versions/search", filter=f"name='{name}'", max_results=1000), "listing versions")
    versions: dict[str, str] = {}
    for v in found.get("model_versions", []):
        for t in v.get("tags", []):
            if t.get("key") == RELEASE_TAG:
                versions[str(t.get("value"))] = str(v["version"])
    out: dict[str, str | None] = {}
    for alias in ALIASES:
        rid = stages.get(alias)
        if rid is None:
            c.ok(c.call("DELETE", "registered-models/alias", {"name": name, "alias": alias}), "removing an alias",
                 ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"))  # fmt: skip
            out[alias] = None
            continue
        if rid not in versions:
            with _lock:
                run = _active_run.get(c.uri) if alias == "candidate" else None
            versions[rid] = _register(c, registry, name, rid, run, exp)
        body = {"name": name, "alias": alias, "version": versions[rid]}
        c.ok(c.call("POST", "registered-models/alias", body), f"setting alias {alias}")
        out[alias] = versions[rid]
    return out


def _register(c: Client, registry: Any, name: str, rid: str, run: dict[str, Any] | None, exp: Callable[[], str]) -> str:
    """A release as a model version. The weights stay in mlops's store (the source of truth); the
    version's source is a run's `release/` artifacts holding the release manifest (artifact URI,
    sha256, lineage): the run that trained it when that is this process's (a new candidate),
    else a small run `release-<id>` made for it (a release from before MLflow was configured)."""
    m = registry.manifest(rid) or {}
    art = m.get("artifact") or {}
    if run is None:
        run = start_run(c, exp(), f"release-{rid}", {RELEASE_TAG: rid})
        c.ok(c.call("POST", "runs/update", {"run_id": run["info"]["run_id"], "status": "FINISHED", "end_time": _ms()}),
             "ending a release run")  # fmt: skip
    c.put_artifact(run, "release/manifest.json", json.dumps(m, indent=2, default=str).encode())
    tags = {RELEASE_TAG: rid, "mlops.artifact_uri": art.get("uri"), "mlops.sha256": art.get("sha256")}
    body: dict[str, Any] = {
        "name": name,
        "source": f"{run['info']['artifact_uri']}/release",
        "run_id": run["info"]["run_id"],
        "tags": [{"key": k, "value": str(v)} for k, v in tags.items() if v],
        "description": f"mlops release {rid}",
    }
    made = c.ok(c.call("POST", "model-versions/create", body), f"registering {rid}")
    return str(made["model_version"]["version"])


def _ms() -> int:
    return int(time.time() * 1000)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
