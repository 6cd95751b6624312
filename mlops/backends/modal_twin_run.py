"""The processes of the Modal twin (`modal_twin.py`): what runs "in a container".

    python -m mlops.backends.modal_twin_run ...
    _inspect MODULE          print the functions MODULE defines: Secrets, env=, image ENV, web kind, proxy auth
    _run APP                 Modal's web proxy for APP on its port, in front of its containers, until SIGTERM
    _asgi APP PORT           one container of APP's ASGI function (the gateway) under uvicorn on PORT
    _schedule APP            APP's scheduled functions on their periods, until SIGTERM (modal_twin_schedule.py)
    _tick APP FUNCTION P     one scheduled invocation: FUNCTION's plain body, period P seconds
    _call APP FUNCTION FILE  run FUNCTION's plain body with the pickled args in FILE, result (or the
                             exception it raised) in FILE.out

Each runs with the app's code snapshot as its only PYTHONPATH, so it runs the code deployed, and
(but `_inspect`, the deploying machine) with only the environment a Modal container would have.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mlops.backends.modal_settings import TWIN_ENV, current_settings
from mlops.backends.modal_twin_scale import Pool
from mlops.backends.modal_twin_schedule import period_seconds, serve_schedule, tick

_BODY = "_body"  # `train` runs `train_body`, `serve` runs `serve_body`, `gateway` runs `gateway_body`


def _functions(mod: ModuleType) -> dict[str, Any]:
    """Modal Functions in `mod` -> their Secrets and web settings (private SDK fields: the twin is
    test tooling, and these are the fields `modal deploy` sends)."""
    import modal
    from modal._utils.async_utils import synchronizer

    out: dict[str, Any] = {}
    for name, obj in vars(mod).items():
        if not isinstance(obj, modal.Function):
            continue
        raw = synchronizer._translate_in(obj)
        hook = raw._webhook_config
        kind = None
        if hook is not None and hook.type:
            kind = "web_server" if hook.web_server_port else "asgi"
        secret_names = [s._name for s in raw._spec.secrets if getattr(s, "_name", None)]
        env: dict[str, str] = {}
        for s in raw._spec.secrets:  # `env=` reaches Modal as a Secret.from_dict
            if getattr(s, "_load_env_dict", None) is not None and not getattr(s, "_name", None):
                env |= s._load_env_dict()
        out[name] = {
            # seconds between invocations (a scheduled function), or None
            "schedule": period_seconds(getattr(getattr(raw, "_function_info", None), "schedule", None)),
            "secrets": secret_names,
            "env": env,
            "image_env": _image_env(raw._spec.image),
            "web": kind,
            "proxy_auth": bool(hook and hook.requires_proxy_auth),
        }
    return out


def _image_env(image: Any) -> dict[str, str]:
    """The ENV of the function's image, as functions/images.py declares it (IMAGE_ENV by the
    image's name there): Modal keeps it in the image's build, out of reach of the SDK objects."""
    import modal
    from modal._utils.async_utils import synchronizer

    images = sys.modules.get("images")
    for name, obj in (vars(images) if images is not None else {}).items():
        if isinstance(obj, modal.Image) and synchronizer._translate_in(obj) is image:
            return dict(getattr(images, "IMAGE_ENV", {}).get(name, {}))
    return {}


def _twin() -> Any:
    from mlops.backends.modal_twin import TwinAPI

    return TwinAPI(Path(os.environ[TWIN_ENV]), current_settings())


def standalone_command(mod: ModuleType, prompt: str) -> Callable[..., list[str]]:
    """The module's own vLLM argv, with vLLM swapped for the builtin engine's standalone server
    (same flags), bound to 127.0.0.1."""

    def build(*args: Any, **kw: Any) -> list[str]:
        argv = list(mod.vllm_command(*args, **kw))
        at = next(i for i, a in enumerate(argv) if a in ("serve", "vllm.entrypoints.openai.api_server"))
        rest = argv[at + 1 :]
        if "--host" in rest:
            rest[rest.index("--host") + 1] = "127.0.0.1"
        return [sys.executable, "-m", "mlops.serving.standalone", *rest, "--prompt", prompt]

    return build


def _proxy(box: Pool, check: Callable[[str | None, str | None], bool] | None) -> Any:
    """Modal's web proxy, as far as the backend relies on it: 401 without a Proxy Auth Token when
    the function requires one (and no container boots); everything else waits for a container
    (see modal_twin_scale) and is forwarded as is (streams included)."""
    import anyio
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), trust_env=False)

    async def forward(request: Request) -> Response:
        if check is not None and not check(request.headers.get("modal-key"), request.headers.get("modal-secret")):
            return PlainTextResponse("modal-http: missing credentials for proxy authorization", status_code=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.body()
        try:
            upstream = await anyio.to_thread.run_sync(box.begin)
        except Exception:  # the server failed to start: the container dies, with its log
            traceback.print_exc()
            os._exit(1)
        req = client.build_request(
            request.method, upstream + request.url.path, params=request.query_params, headers=headers, content=body
        )
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            box.end(upstream)
            return PlainTextResponse(f"modal-http: app unreachable ({type(e).__name__})", status_code=502)

        async def done() -> None:
            await resp.aclose()
            box.end(upstream)

        out = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=out, background=BackgroundTask(done)
        )

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def _run(name: str) -> int:
    import uvicorn

    api = _twin()
    app = api._apps()[name]
    mod = importlib.import_module(app["module"])
    fn = app["web"]
    spec = app["functions"][fn]
    check = api.proxy_token_ok if spec["proxy_auth"] else None
    low = int(getattr(mod, "MIN_CONTAINERS", api.settings.min_containers))  # as the decorator says
    high = int(getattr(mod, "MAX_CONTAINERS", api.settings.max_containers))
    if spec["web"] == "web_server":
        command = standalone_command(mod, getattr(mod, "PROMPT", api.settings.prompt))  # a judge's own prompt
        body = getattr(mod, fn + _BODY)
        box = Pool(
            api,
            name,
            lambda port: body(root=api.volume_dir, port=port, command=command, api=api),
            min_containers=low,
            max_containers=high,
        )
    else:  # an ASGI function (the gateway): each container is a process of its own
        box = Pool(
            api, name, lambda port: _start_asgi(name, port), min_containers=low, max_containers=high, gpu_boot=False
        )
    if box.scale_to_zero:
        threading.Thread(target=box.reap_forever, daemon=True, name="scaledown").start()
    else:  # one container from the deploy on; a server that fails to start ends this process
        box.end(box.begin())

    def stop(signum: int, frame: Any) -> None:
        box.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"twin: {name}/{fn} on 127.0.0.1:{app['port']}", flush=True)
    try:
        uvicorn.run(_proxy(box, check), host="127.0.0.1", port=int(app["port"]), log_level="warning")
    finally:
        box.kill()
    return 0


ASGI_START_S = 120.0  # a container's import and lifespan start (bounded wait)


def _start_asgi(name: str, port: int) -> subprocess.Popen[str]:
    """Start one container of the app's ASGI function and return once it listens; one that
    exits first raises (its output is already in the app's log)."""
    cmd = [sys.executable, "-m", "mlops.backends.modal_twin_run", "_asgi", name, str(port)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + ASGI_START_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the container of {name} exited with code {proc.returncode} before serving")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the container of {name} did not listen on :{port} within {ASGI_START_S:.0f}s")
        time.sleep(0.05)  # polling a port: nothing to wait on instead


def _asgi(name: str, port: int) -> int:
    """One container: the function's ASGI app under uvicorn; SIGTERM (a scale-down) runs its
    lifespan shutdown, as Modal's does (the gateway flushes its stats and capture)."""
    import uvicorn

    api = _twin()
    app = api._apps()[name]
    mod = importlib.import_module(app["module"])
    asgi = getattr(mod, app["web"] + _BODY)(api)
    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    return 0


def _call(name: str, function: str, io_file: str) -> int:
    """("ok", result) or ("error", the exception, its traceback) in `io_file`.out: Modal re-raises
    a remote exception's own class in the caller."""
    api = _twin()
    app = api._apps()[name]
    mod = importlib.import_module(app["module"])
    args = pickle.loads(Path(io_file).read_bytes())
    try:
        result = getattr(mod, function + _BODY)(*args, root=str(api.volume_dir))
    except Exception as e:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        try:
            blob = pickle.dumps(("error", e, tb))
        except Exception:  # an exception that does not pickle arrives as the caller's own error
            blob = pickle.dumps(("error", None, tb))
        Path(io_file + ".out").write_bytes(blob)
        return 1
    Path(io_file + ".out").write_bytes(pickle.dumps(("ok", result)))
    return 0


def internal(argv: list[str]) -> int:
    if argv[0] == "_inspect":
        print(json.dumps(_functions(importlib.import_module(argv[1]))))
        return 0
    if argv[0] == "_run":
        return _run(argv[1])
    if argv[0] == "_asgi":
        return _asgi(argv[1], int(argv[2]))
    if argv[0] == "_schedule":
        return serve_schedule(_twin(), argv[1])
    if argv[0] == "_tick":
        return tick(argv[1], argv[2], float(argv[3]))
    return _call(argv[1], argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(internal(sys.argv[1:]))
