"""vLLM's OpenAI-compatible server for ONE release (or one self-hosted judge), scaled to zero when idle.

Each release is its own app, `{app}-serve-<release>`, so its URL never changes while it lives and
rollback is only a routing change. `mlops deploy` (ModalBackend's preflight) stages the release on
the Volume and runs, in effect:

    MLOPS_RELEASE=<id> MLOPS_RELEASE_SHA256=<digest> modal deploy functions/serve.py --name {app}-serve-<id>

The container refuses to start vLLM unless every file matches the staged manifest and the manifest
matches the digest given at deploy time (which came from the registry). vLLM requires an API key
(`MLOPS_VLLM_API_KEY` from the `{app}-auth` Modal Secret) and refuses to start without one; only
the gateway presents it, so clients go through the gateway's own keys.

A self-hosted judge (`judges.<name>.source` in mlops.yaml) is the same app with MLOPS_JUDGE set:
`{app}-judge-<name>`, its model staged under judges/<name>/ (checked the same way) or, for a
Hugging Face id, downloaded by vLLM at start; only `functions/evaluate.py` calls it (it holds the
Proxy Auth Token and the vLLM key from the same Secret).

    MLOPS_JUDGE=<name> MLOPS_JUDGE_MODEL=<served name> MLOPS_RELEASE_SHA256=<digest> \
        modal deploy functions/serve.py --name {app}-judge-<name>

A base for adapter releases (`lora.serve: adapter`) is the same app with MLOPS_BASE set: one app,
`{app}-serve-base-<key>`, serves the base (staged under serve-bases/<key>/, checked the same way)
with `--enable-lora`, and every adapter release on it is loaded into it at run time: no app per
release. ModalBackend stages an adapter release as any other and puts `adapter:<release>` =
{"base": <key>, "sha256": <digest>} in the Dict; each container of the base app follows those
entries (`sync_adapters`, every ADAPTER_SYNC_S), checks the staged files against the digest and
loads the adapter into its vLLM (POST /v1/load_lora_adapter), and unloads one whose entry is
cleared. The gateway sends an adapter release's requests to the base app as `model: <release>`.

    MLOPS_BASE=<key> MLOPS_RELEASE_SHA256=<digest> modal deploy functions/serve.py --name {app}-serve-base-<key>
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import modal
from images import VOLUME_MOUNT, auth_secret, extra_secrets, settings, vllm_image, volume

from mlops.backends.modal_api import ModalAPI, ModalSDK
from mlops.backends.modal_settings import ADAPTER_KEY, FAILURE_KEY, SERVE_BASES, VLLM_PORT
from mlops.registry.releases import sha256_file, tree_sha256
from mlops.serving.uptime import Uptime
from mlops.serving.vllm_argv import (
    DEFAULT_OPTIONS,
    LORA_ENV,
    template_flag,
    vllm_command,
    vllm_env,
)

RELEASE = os.environ.get("MLOPS_RELEASE", "")
RELEASE_SHA256 = os.environ.get("MLOPS_RELEASE_SHA256", "")
JUDGE = os.environ.get("MLOPS_JUDGE", "")  # set: this app serves a self-hosted judge, not a release
JUDGE_MODEL = os.environ.get("MLOPS_JUDGE_MODEL", "") or JUDGE  # the judge's served name
JUDGE_HF = os.environ.get("MLOPS_JUDGE_HF", "")  # a Hugging Face id: vLLM downloads it at start
BASE = os.environ.get("MLOPS_BASE", "")  # set: this app serves a base that adapter releases load into
# How a chat turn becomes the judge model's prompt (a model trained here has no chat template).
PROMPT = os.environ.get("MLOPS_JUDGE_PROMPT", "{input}") if JUDGE else settings.prompt
GPU = os.environ.get("MLOPS_SERVE_GPU") or settings.serve_gpu
PORT = VLLM_PORT
LOG_TAIL = 40  # lines of a failed start shown in the error
ADAPTER_SYNC_S = 2.0  # how often a base app's container looks for adapter releases to (un)load

APP_NAME = settings.judge_app(JUDGE) if JUDGE else settings.base_app(BASE) if BASE else settings.serve_app(RELEASE)
MIN_CONTAINERS = 0 if JUDGE else settings.min_containers  # a judge works only while evals run
MAX_CONTAINERS = settings.max_containers
app = modal.App(APP_NAME)


def prepare_release(root: str | Path, release_id: str, expected_sha256: str, kind: str = "releases") -> Path:
    """The staged model directory of `release_id` (a judge's name with kind="judges"), after
    checking every file's sha256 against the staged manifest and the manifest's digest against
    `expected_sha256` (from the registry, or the judge's directory as the client hashed it)."""
    base = Path(root) / kind / release_id
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


def start_server(cmd: list[str], env: dict[str, str], port: int, timeout: float) -> subprocess.Popen[str]:
    """Start the server and return once it listens on `port`. One that exits first raises at once
    with the end of its log (rather than holding the container until `startup_timeout`)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)

    def pump() -> None:  # the log still reaches Modal's (or the twin's) log, line by line
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            reader.join(timeout=5)
            log = "\n".join(tail) or "(no output)"
            raise RuntimeError(f"{cmd[0]} exited with code {proc.returncode} before serving:\n{log}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not listen on :{port} within {timeout:.0f}s")
        time.sleep(0.25)  # polling a port: nothing to wait on instead


def serve_body(
    root: str | Path = VOLUME_MOUNT,
    port: int = PORT,
    command: Callable[..., list[str]] | None = None,
    timeout: float | None = None,
    api: ModalAPI | None = None,
) -> subprocess.Popen[str]:
    """Check the staged release, then start its OpenAI server (vLLM, or what `command` builds from
    the same arguments: the local twin's stand-in) and wait until it listens. Plain Python.
    A base app (MLOPS_BASE) then loads the adapter releases deployed on it (`api`: the Dict)."""
    if BASE:
        return serve_base(root, port, command, timeout, api)
    name, aliases = (JUDGE_MODEL, ()) if JUDGE else (RELEASE, (settings.served_model,))
    if JUDGE_HF and JUDGE:
        model: str | Path = JUDGE_HF
    elif JUDGE:
        model = prepare_release(root, JUDGE, RELEASE_SHA256, kind="judges")
    elif not RELEASE:
        raise RuntimeError("MLOPS_RELEASE is not set: deploy a release with `mlops deploy --release ID`")
    else:
        model = prepare_release(root, RELEASE, RELEASE_SHA256)
    template = None
    if isinstance(model, Path):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlops_chat_template_{JUDGE or RELEASE}.jinja"
        template = template_flag(model, PROMPT, path)
    build = command or vllm_command
    # mlops.yaml's deploy.vllm is for the deployed model; a judge's app keeps the defaults
    options = DEFAULT_OPTIONS if JUDGE else settings.vllm_args
    cmd = build(model, name, port, aliases=aliases, chat_template=template, options=options)
    print("starting:", " ".join(cmd), flush=True)
    env = vllm_env(where=f"add it to the Modal Secret {settings.auth_secret!r}")
    proc = start_server(cmd, env, port, float(timeout or settings.startup_timeout))
    if not JUDGE:  # a judge's GPU time is its evals' (eval_gpu_hours), not serving
        count_uptime(api, [RELEASE], proc)
    return proc


def count_uptime(api: ModalAPI | None, releases: list[str], proc: subprocess.Popen[str]) -> None:
    """This container's GPU time, in the Dict until `mlops` makes it cost records (serve_gpu_hours)."""
    put = (api or ModalSDK(settings)).dict_put
    Uptime(put, APP_NAME, gpu=GPU, releases=releases, model=settings.served_model).follow(proc)


def serve_base(
    root: str | Path,
    port: int,
    command: Callable[..., list[str]] | None,
    timeout: float | None,
    api: ModalAPI | None,
) -> subprocess.Popen[str]:
    """The base's vLLM with --enable-lora and runtime adapter loading, its adapters loaded."""
    model = prepare_release(root, BASE, RELEASE_SHA256, kind=SERVE_BASES)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlops_chat_template_base_{BASE}.jinja"
    cmd = (command or vllm_command)(
        model,
        f"base-{BASE}",
        port,
        chat_template=template_flag(model, PROMPT, path),
        options=[*settings.vllm_args, *settings.lora_args],
    )
    print("starting:", " ".join(cmd), flush=True)
    env = vllm_env(where=f"add it to the Modal Secret {settings.auth_secret!r}") | LORA_ENV
    proc = start_server(cmd, env, port, float(timeout or settings.startup_timeout))
    count_uptime(api, [], proc)  # the base's time; its adapters share it
    sync = AdapterSync(api or ModalSDK(settings), root, port, env["VLLM_API_KEY"])
    try:
        sync.once()  # what is deployed already is loaded before this container takes requests
    except Exception as e:  # the Dict unreachable a moment: the sync thread tries again
        print(f"adapter sync: {type(e).__name__}: {e}", flush=True)
    threading.Thread(target=sync.forever, args=(proc,), daemon=True, name="adapter-sync").start()
    return proc


class AdapterSync:
    """Keeps one container's vLLM loaded with the adapter releases the Dict assigns to its base."""

    def __init__(self, api: ModalAPI, root: str | Path, port: int, key: str) -> None:
        import httpx

        self.api, self.root = api, root
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {key}"},
            timeout=120.0,
            trust_env=False,
        )
        self.loaded: dict[str, str] = {}  # release -> the digest its files were checked against

    def wanted(self) -> dict[str, str]:
        entries = self.api.dict_items(ADAPTER_KEY)
        return {
            k.removeprefix(ADAPTER_KEY): str(v["sha256"])
            for k, v in entries.items()
            if isinstance(v, dict) and v.get("base") == BASE and v.get("sha256")
        }

    def once(self) -> None:
        want = self.wanted()
        for rid, digest in sorted(want.items()):
            if self.loaded.get(rid) == digest:
                continue
            with contextlib.suppress(Exception):  # Modal: see files committed since this container started
                volume.reload()
            try:
                adapter_dir = prepare_release(self.root, rid, digest)
                body = {"lora_name": rid, "lora_path": str(adapter_dir), "load_inplace": rid in self.loaded}
                r = self.http.post("/v1/load_lora_adapter", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"vLLM answered {r.status_code}: {r.text[:300]}")
            except Exception as e:  # this adapter is not served (the deploy waits and says so); the others are
                print(f"adapter {rid}: not loaded: {type(e).__name__}: {e}", flush=True)
                continue
            self.loaded[rid] = digest
            print(f"adapter {rid}: loaded", flush=True)
        for rid in sorted(set(self.loaded) - set(want)):
            r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": rid})
            if r.status_code in (200, 404):
                del self.loaded[rid]
                print(f"adapter {rid}: unloaded", flush=True)

    def forever(self, proc: subprocess.Popen[str]) -> None:
        while proc.poll() is None:
            time.sleep(ADAPTER_SYNC_S)  # polling the Dict: Modal offers nothing to wait on
            try:
                self.once()
            except Exception as e:  # a Dict or network hiccup: the next round tries again
                print(f"adapter sync: {type(e).__name__}: {e}", flush=True)


def judge_env() -> dict[str, str]:
    """What a judge's container needs to rebuild this module as deployed (nothing for a release)."""
    if not JUDGE:
        return {}
    env = {"MLOPS_JUDGE": JUDGE, "MLOPS_JUDGE_MODEL": JUDGE_MODEL, "MLOPS_JUDGE_PROMPT": PROMPT}
    env |= {"MLOPS_SERVE_GPU": GPU} if GPU else {}
    # the image is offline (weights come from the Volume); a Hub judge is the one download
    return env | ({"MLOPS_JUDGE_HF": JUDGE_HF, "HF_HUB_OFFLINE": "0"} if JUDGE_HF else {})


@app.function(
    image=vllm_image,
    gpu=GPU,
    volumes={VOLUME_MOUNT: volume.with_mount_options(read_only=True)},  # serving never writes artifacts
    secrets=[auth_secret(), *extra_secrets()],
    env=settings.env(
        MLOPS_RELEASE=RELEASE,
        MLOPS_RELEASE_SHA256=RELEASE_SHA256,
        **judge_env(),
        **({"MLOPS_BASE": BASE} if BASE else {}),
    ),
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=settings.scaledown_window,
    timeout=settings.startup_timeout,
)
@modal.concurrent(max_inputs=settings.max_inputs)
# requires_proxy_auth: only callers with the workspace's Proxy Auth Token (the gateway) reach the
# container; anyone else gets 401 from Modal's proxy and boots no GPU.
@modal.web_server(port=PORT, startup_timeout=settings.startup_timeout, requires_proxy_auth=True)
def serve() -> None:
    start_or_report(serve_body)  # @modal.web_server then routes to the port it listens on


def start_or_report(body: Callable[[], object], api: ModalSDK | None = None) -> None:
    """Run `body`; if the server dies at start, say why in the Dict before failing: the client
    polls it (ModalSDK.failure) and fails at once, rather than waiting out startup_timeout while
    Modal restarts a GPU container over and over."""
    try:
        body()
    except Exception as e:
        with contextlib.suppress(Exception):  # the container's own error (and its log) come first
            (api or ModalSDK(settings)).dict_put(FAILURE_KEY + APP_NAME, f"{type(e).__name__}: {e}"[-4000:])
        raise
