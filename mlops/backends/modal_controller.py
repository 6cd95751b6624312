"""Deploying the rollout controller on Modal (`{app}-controller`, functions/controller.py): it is
deployed with the gateway, by whatever deploys the gateway (ModalBackend), and redeployed when the
code, the settings or the config it judges by change.

Its own app, not a function of the gateway's: what it is deployed with (the config bundle below)
changes with every edit of mlops.yaml or of the first eval suite, and a redeploy of the gateway
replaces the endpoint's containers; and `modal app stop {app}-controller` freezes every rollout
where it stands (the record waits; `mlops status` says so) without taking the endpoint down.

A container has no checkout: the bundle is mlops.yaml as written (without a run's `--set`) and
the rows of the first eval suite (what replayed canary traffic asks), written to the
Volume under controller/<digest>.json (content-addressed, so a deploy never changes what a running
invocation reads) and named in the function's env.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlops.backends.modal_settings import CONTROLLER_BUNDLE_ENV, CONTROLLER_DIR, SETTINGS_ENV
from mlops.config import Loaded
from mlops.errors import ConfigError

# `backend`: the mlops.backends.modal.ModalBackend deploying it (not imported: it imports this module)
ModalBackend = Any

SCRIPT = "controller.py"
BUNDLE_DATA = "data"  # where a shipped dataset file lands beside the bundle's mlops.yaml


def bundle(loaded: Loaded) -> bytes:
    """What the controller's container loads its config from (see the module docstring): the
    config file as written, without the run's `--set` overrides (a rollout carries its own steps,
    bake and traffic in its record; one job's overrides do not reconfigure the controller every
    model shares). A local file of the first eval suite is shipped (its path rewritten); a remote
    source (hf:, s3://) is read from the container; a directory is not shipped (replayed traffic
    then fails, logged)."""
    from mlops.config import load

    file = load(loaded.path, check_files=False)
    raw: dict[str, Any] = json.loads(json.dumps(file.raw, default=str))
    files: dict[str, str] = {}
    cfg = file.cfg
    if cfg.evals:
        name = next(iter(cfg.evals.values())).dataset
        path = file.dataset_path(name)
        if path.is_file():
            rel = f"{BUNDLE_DATA}/{name}{''.join(path.suffixes)}"
            files[rel] = path.read_text(encoding="utf-8")
            table = raw.setdefault("datasets", {})
            entry = table.get(name)
            table[name] = {**entry, "path": rel} if isinstance(entry, dict) else {"path": rel}
    return json.dumps({"raw": raw, "files": files}, sort_keys=True).encode()


def ensure_controller(backend: ModalBackend, required: bool = False) -> bool:
    """Deploy `{app}-controller` unless it runs the code, settings and bundle it would now (True
    when it is deployed). A project without functions/controller.py (made before it existed)
    deploys no controller: False, or with `required` (a `--no-wait` rollout) a one-line error."""
    s = backend.settings
    script = backend.functions_dir / SCRIPT
    if not script.is_file():
        if required:
            raise ConfigError(
                f"--no-wait on backend: modal needs the rollout controller app {s.controller_app!r}, deployed from "
                f"functions/{SCRIPT}, which this project lacks: copy it from the mlops template "
                "(`mlops init` in an empty directory writes it), or run with --wait"
            )
        return False
    from mlops.backends.modal_settings import code_digest

    data = bundle(backend.loaded)
    key = f"{CONTROLLER_DIR}/{hashlib.sha256(data).hexdigest()[:24]}.json"
    digest = hashlib.sha256(f"{code_digest(backend.functions_dir, s)}:{key}".encode()).hexdigest()
    app = s.controller_app
    if (app, digest) in backend._current:
        return True
    api = backend.api
    if api.dict_get(f"code:{app}") != digest or app not in api.deployed():
        api.volume_put({key: data})
        api.deploy(script, app, {SETTINGS_ENV: s.to_json(), CONTROLLER_BUNDLE_ENV: key})
        api.dict_put(f"code:{app}", digest)
    backend._current.add((app, digest))
    return True


def unpack(raw_bundle: bytes, dest: Path, storage: str) -> Path:
    """Write a bundle's mlops.yaml (its storage: the deployed settings', the one the gateway and
    every run use) and files under `dest`; the config's path."""
    import yaml

    doc = json.loads(raw_bundle)
    for rel, text in doc["files"].items():
        p = dest / rel
        if dest.resolve() not in p.resolve().parents:
            raise ConfigError(f"the controller bundle names a file outside its directory: {rel!r}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    raw = dict(doc["raw"])
    if storage:
        raw["storage"] = storage
    cfg = dest / "mlops.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return cfg
