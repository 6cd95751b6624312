"""Evals on Modal: self-hosted judges as their own vLLM apps, and heavy scoring fanned out to
`functions/evaluate.py` with `.map()`.

A judge declared with `source` (mlops.yaml `judges.<name>`) is deployed like a release:
functions/serve.py with MLOPS_JUDGE=<name>, as `{app}-judge-<name>`, its model staged on the Volume
under judges/<name>/ with a manifest the container checks. It is redeployed when what it would
serve changes (the model files, its served name, GPU, the code), and stopped once mlops.yaml no
longer declares it. Only the eval function calls it (the app requires a Proxy Auth Token).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlops.backends.modal_settings import SETTINGS_ENV, code_digest, files_with_sha256
from mlops.config import JudgeCfg
from mlops.errors import ConfigError, InfraError, MlopsError
from mlops.registry.releases import tree_sha256

# `backend` below is a ModalBackend (not imported: modal.py imports this module lazily)
ModalBackend = Any

RELEASE_PREFIX = "release:"
DEFAULT_JUDGE_GPU = "L4"


def self_hosted(backend: ModalBackend) -> dict[str, JudgeCfg]:
    return {n: j for n, j in backend.cfg.judges.items() if j.self_hosted}


def _model(backend: ModalBackend, name: str, j: JudgeCfg) -> tuple[Path | None, dict[str, Any], str]:
    """(local model directory or None for a Hub id, its artifact {files, sha256}, its prompt)."""
    src = str(j.source)
    if src.startswith(RELEASE_PREFIX):
        rid = src.removeprefix(RELEASE_PREFIX)
        manifest = backend.registry.require(rid)
        prompt = str((manifest.get("config") or {}).get("prompt") or "{input}")
        return backend.registry.artifact_dir(rid), dict(manifest["artifact"]), prompt
    path = (backend.loaded.root / src).resolve()
    if path.is_dir():
        files = files_with_sha256(path)
        if not files:
            raise ConfigError(f"judges.{name}.source: {path} is empty")
        return path, {"files": files, "sha256": tree_sha256(files)}, "{input}"
    if src.startswith((".", "/")) or src.count("/") != 1:
        raise ConfigError(
            f"judges.{name}.source: {src!r} is neither a directory nor release:<id> nor a Hugging Face id (org/name)"
        )
    return None, {"hf": src, "sha256": hashlib.sha256(f"hf:{src}".encode()).hexdigest()}, "{input}"


def sync_judges(backend: ModalBackend) -> dict[str, str]:
    """Deploy every self-hosted judge whose app is not up with what it would serve now, stop
    those no longer declared; return {judge name: its app}."""
    s, api = backend.settings, backend.api
    judges = self_hosted(backend)
    apps = {n: s.judge_app(n) for n in judges}
    deployed = api.deployed()
    prefix = s.judge_app("") + "-"
    for app in sorted(a for a in deployed if a.startswith(prefix) and a not in apps.values()):
        api.stop(app)  # no longer declared: it would keep a GPU for nothing (min_containers is 0 anyway)
    serve = backend.functions_dir / "serve.py"
    for name, j in judges.items():
        model_dir, artifact, prompt = _model(backend, name, j)
        env = {
            SETTINGS_ENV: s.to_json(),
            "MLOPS_JUDGE": name,
            "MLOPS_JUDGE_MODEL": j.model,
            "MLOPS_JUDGE_PROMPT": prompt,
            "MLOPS_SERVE_GPU": j.gpu or DEFAULT_JUDGE_GPU,
            "MLOPS_RELEASE_SHA256": str(artifact["sha256"]),
        } | ({"MLOPS_JUDGE_HF": str(artifact["hf"])} if model_dir is None else {})
        digest = hashlib.sha256(
            json.dumps([env, code_digest(backend.functions_dir, s)], sort_keys=True).encode()
        ).hexdigest()
        if api.dict_get(f"code:{apps[name]}") == digest and apps[name] in deployed:
            continue
        if model_dir is not None:
            files: dict[str, Path | bytes] = {
                f"judges/{name}/model/{rel}": model_dir / rel for rel in artifact["files"]
            }
            staged = {"id": name, "artifact": {"files": artifact["files"], "sha256": artifact["sha256"]}}
            files[f"judges/{name}/manifest.json"] = json.dumps(staged, sort_keys=True).encode()
            api.volume_put(files)
        api.deploy(serve, apps[name], env)
        api.dict_put(f"code:{apps[name]}", digest)
    return apps


def map_with_hint(api: Any, app: str, inputs: list[dict[str, Any]], failed: Any) -> list[dict[str, Any]]:
    """`score` mapped over the batches. Modal re-raises a remote exception's own class (a judge
    that never answered is a RuntimeError from the eval function, not a Modal error): any failure
    is one InfraError line, naming the judge app that died where one did."""
    try:
        return list(api.map(app, "score", inputs))
    except Exception as e:
        dead = failed()
        what = e.headline if isinstance(e, MlopsError) else f"{app}/score failed on Modal: {type(e).__name__}: {e}"
        what = (what.strip().splitlines() or [type(e).__name__])[0][:500]
        if isinstance(e, MlopsError) and not dead:
            raise
        raise InfraError(f"{what}{' (judge app ' + dead[0] + ')' if dead else ''}") from e


def remote_scoring(backend: ModalBackend) -> Any:
    """The harness hook (`Server.remote_scoring`): judges synced now, heavy metrics mapped over
    case batches on `{app}-eval` when a suite is scored."""
    from mlops.evals.fanout import remote_metrics
    from mlops.evals.harness import metric_specs

    s, api = backend.settings, backend.api
    apps = sync_judges(backend)
    ready: list[bool] = []

    def failed_judges() -> list[str]:
        return [f"{a}: {f}" for a in apps.values() if (f := api.failure(a))]

    def run_map(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not ready:
            backend.ensure_current("evaluate.py", s.eval_app)
            ready.append(True)
        dead = failed_judges()  # known already (the twin knows at once): fail now, not after the
        if dead:  # eval function has waited out a judge's whole start-up timeout
            raise InfraError(f"the judge app {dead[0]}")
        return map_with_hint(api, s.eval_app, inputs, failed_judges)

    def swap(suite: str, metrics: list[Any], clients: dict[str, Any]) -> list[Any]:
        judges: dict[str, dict[str, Any]] = {}
        for name, j in backend.cfg.judges.items():
            entry: dict[str, Any] = {"spec": j.model_dump(mode="json")}
            if name in apps:
                url = api.web_url(apps[name], "serve")
                if not url:
                    raise InfraError(f"{apps[name]}/serve has no web URL (deploy it: mlops eval on backend: modal)")
                entry["url"] = url
            judges[name] = entry
        return remote_metrics(metric_specs(backend.loaded, suite), metrics, judges, clients, run_map)

    return swap
