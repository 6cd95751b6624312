"""vLLM's OpenAI-compatible server for ONE release, scaled to zero when idle.

Each release is its own app, `{app}-serve-<release>`, so its URL never changes while it lives and
rollback is only a routing change. `mlops deploy` (ModalBackend's preflight) stages the release on
the Volume and runs, in effect:

    MLOPS_RELEASE=<id> MLOPS_RELEASE_SHA256=<digest> modal deploy functions/serve.py --name {app}-serve-<id>

The container refuses to start vLLM unless every file matches the staged manifest and the manifest
matches the digest given at deploy time (which came from the registry). vLLM requires an API key
(`MLOPS_VLLM_API_KEY` from the `{app}-auth` Modal Secret) and refuses to start without one; only
the gateway presents it, so clients go through the gateway's own keys.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import modal
from images import VOLUME_MOUNT, auth_secret, extra_secrets, settings, vllm_image, volume

from mlops.backends.modal import VLLM_PORT
from mlops.registry.releases import sha256_file, tree_sha256
from mlops.serving.vllm_argv import chat_template_for, vllm_command, vllm_env

RELEASE = os.environ.get("MLOPS_RELEASE", "")
RELEASE_SHA256 = os.environ.get("MLOPS_RELEASE_SHA256", "")
PORT = VLLM_PORT

app = modal.App(settings.serve_app(RELEASE))


def prepare_release(root: str | Path, release_id: str, expected_sha256: str) -> Path:
    """The staged model directory of `release_id`, after checking every file's sha256 against the
    staged manifest and the manifest's digest against `expected_sha256` (from the registry)."""
    base = Path(root) / "releases" / release_id
    manifest = json.loads((base / "manifest.json").read_text())
    art = manifest["artifact"]
    if not expected_sha256 or art["sha256"] != expected_sha256:
        raise RuntimeError(
            f"{release_id}: staged manifest digest {art['sha256'][:12]} != deployed {expected_sha256[:12]}"
        )
    if tree_sha256(art["files"]) != art["sha256"]:
        raise RuntimeError(f"{release_id}: staged manifest is inconsistent")
    model_dir = base / "model"
    for rel, want in art["files"].items():
        p = model_dir / rel
        if not p.is_file():
            raise RuntimeError(f"{release_id}: {rel} is missing from the Volume")
        if sha256_file(p) != want:
            raise RuntimeError(f"{release_id}: {rel} does not match its sha256")
    return model_dir


@app.function(
    image=vllm_image,
    gpu=settings.serve_gpu,
    volumes={VOLUME_MOUNT: volume.read_only()},  # serving never writes artifacts
    secrets=[auth_secret(), *extra_secrets()],
    env=settings.env(MLOPS_RELEASE=RELEASE, MLOPS_RELEASE_SHA256=RELEASE_SHA256),
    min_containers=settings.min_containers,
    max_containers=settings.max_containers,
    scaledown_window=settings.scaledown_window,
    timeout=settings.startup_timeout,
)
@modal.concurrent(max_inputs=settings.max_inputs)
@modal.web_server(port=PORT, startup_timeout=settings.startup_timeout)
def serve() -> None:
    if not RELEASE:
        raise RuntimeError("MLOPS_RELEASE is not set: deploy a release with `mlops deploy --release ID`")
    model_dir = prepare_release(VOLUME_MOUNT, RELEASE, RELEASE_SHA256)
    template = None
    tok_cfg = model_dir / "tokenizer_config.json"
    has_template = (model_dir / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text())
    )
    if not has_template:
        template = "/tmp/mlops_chat_template.jinja"
        Path(template).write_text(chat_template_for(settings.prompt))
    cmd = vllm_command(model_dir, RELEASE, PORT, aliases=(settings.served_model,), chat_template=template)
    print("starting:", " ".join(cmd), flush=True)
    subprocess.Popen(
        cmd, env=vllm_env(where=f"add it to the Modal Secret {settings.auth_secret!r}")
    )  # @modal.web_server waits for the port to open
