"""Adapter releases on Modal: one vLLM app per base, every adapter release loaded into it.

A release whose manifest carries `adapter` (lora.serve: adapter) gets no app of its own. Deploying
it stages the base once (serve-bases/<key>/, `key` the head of its fingerprint, with a manifest the
container checks every file against), deploys the base's app once (functions/serve.py with
MLOPS_BASE=<key>: vLLM with --enable-lora), stages the adapter as any release, and puts
`adapter:<release>` = {"base": <key>, "sha256": <digest>} in the Dict: each container of the base
app loads it at run time, and the gateway sends its requests there. Canary, promote and rollback
between adapter releases only move the routing; a release that leaves the state has its entry
cleared (its base's containers unload it), and the base's app stops with its last adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlops.backends.modal_settings import ADAPTER_KEY, SERVE_BASES, SETTINGS_ENV
from mlops.registry.releases import sha256_file, tree_sha256

# `b` below is the ModalBackend (typed Any: modal.py imports this module, not the other way round)

BASE_KEY_CHARS = 32  # of the base's fingerprint, naming its directory on the Volume


def base_key(adapter: dict[str, Any]) -> str:
    return str(adapter["base_fingerprint"])[:BASE_KEY_CHARS]


def deploy_adapter(b: Any, release_id: str, manifest: dict[str, Any]) -> None:
    """Load adapter release `release_id` into its base's app (deploying that once); wait until served."""
    from mlops.training.adapter import served_base

    s, api = b.settings, b.api
    key = base_key(manifest["adapter"])
    app = s.base_app(key)
    url = b._gateway_url()
    entry = {"base": key, "sha256": str(manifest["artifact"]["sha256"])}
    wait = float(s.startup_timeout + 60)
    if api.dict_get(ADAPTER_KEY + release_id) == entry and app in api.deployed() and b._healthy(url, release_id, wait):
        return  # loaded already (a rollback to it): nothing to deploy
    base_dir = served_base(release_id, manifest["adapter"], b.loaded.root)  # its fingerprint checked again
    b._stage(release_id, manifest)
    api.dict_put(ADAPTER_KEY + release_id, entry)
    if app not in api.deployed():
        digest = stage_base(b, key, base_dir)
        # the model's own serving settings (GPU, vLLM and LoRA flags), as for a full release's app
        env = {SETTINGS_ENV: b.serve_settings.to_json(), "MLOPS_BASE": key, "MLOPS_RELEASE_SHA256": digest}
        api.deploy(b.functions_dir / "serve.py", app, env)
    b._wait_healthy(url, release_id, wait, app=app)


def stage_base(b: Any, key: str, base_dir: Path) -> str:
    """Copy the base to serve-bases/<key>/ (once: `<key>.complete` is written last); its digest."""
    rel = f"{SERVE_BASES}/{key}"
    try:
        raw = b"".join(b.api.volume_read(f"{rel}.complete"))
        return str(json.loads(raw)["sha256"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    src = sorted(p for p in Path(base_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    files = {p.relative_to(base_dir).as_posix(): sha256_file(p) for p in src}
    digest = tree_sha256(files)
    staged = {"id": key, "artifact": {"files": files, "sha256": digest}}
    upload: dict[str, Path | bytes] = {f"{rel}/model/{p.relative_to(base_dir).as_posix()}": p for p in src}
    upload[f"{rel}/manifest.json"] = json.dumps(staged, sort_keys=True).encode()
    b.api.volume_put(upload)
    b.api.volume_put({f"{rel}.complete": json.dumps({"sha256": digest}).encode()})
    return digest


def keep_bases(b: Any, refs: set[str]) -> set[str]:
    """The base apps the releases `refs` (every model's referenced ones) need; the Dict entry of
    every adapter release not among them is cleared (its base's containers unload it within
    functions/serve.py's ADAPTER_SYNC_S)."""
    keep = set()
    for k, entry in b.api.dict_items(ADAPTER_KEY).items():
        if not isinstance(entry, dict):
            continue
        if k.removeprefix(ADAPTER_KEY) in refs:
            keep.add(b.settings.base_app(str(entry["base"])))
        else:
            b.api.dict_put(k, None)
    return keep
