"""The processes of the Modal twin (`modal_twin.py`): what runs "in a container".

    python -m mlops.backends.modal_twin_run ...
    _inspect MODULE          print the functions MODULE defines: Secrets, web kind, proxy auth
    _run APP                 serve APP's web function on its port until SIGTERM
    _call APP FUNCTION FILE  run FUNCTION's plain body with the pickled args in FILE, result back in FILE

Each runs with the app's code snapshot first on PYTHONPATH, so it runs the code deployed.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mlops.backends.modal_settings import TWIN_ENV, current_settings
from mlops.backends.modal_twin_scale import Container

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
        out[name] = {"secrets": secret_names, "web": kind, "proxy_auth": bool(hook and hook.requires_proxy_auth)}
    return out


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


def _proxy(box: Container, check: Callable[[str | None, str | None], bool] | None) -> Any:
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
            box.end()
            return PlainTextResponse(f"modal-http: app unreachable ({type(e).__name__})", status_code=502)

        async def done() -> None:
            await resp.aclose()
            box.end()

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
    box: Container | None = None
    if spec["web"] == "web_server":
        command = standalone_command(mod, getattr(mod, "PROMPT", api.settings.prompt))  # a judge's own prompt
        body = getattr(mod, fn + _BODY)
        box = Container(api, name, lambda port: body(root=api.volume_dir, port=port, command=command))
        if box.scale_to_zero:
            threading.Thread(target=box.reap_forever, daemon=True, name="scaledown").start()
        else:  # one container from the deploy on; a server that fails to start ends this process
            box.begin()
            box.end()
        asgi = _proxy(box, check)
    else:
        asgi = getattr(mod, fn + _BODY)(api)
        if check is not None:
            asgi = _proxy_wrap(asgi, check)

    def stop(signum: int, frame: Any) -> None:
        if box is not None:
            box.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"twin: {name}/{fn} on 127.0.0.1:{app['port']}", flush=True)
    try:
        uvicorn.run(asgi, host="127.0.0.1", port=int(app["port"]), log_level="warning")
    finally:
        if box is not None:
            box.kill()
    return 0


def _proxy_wrap(asgi: Any, check: Callable[[str | None, str | None], bool]) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            h = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            if not check(h.get("modal-key"), h.get("modal-secret")):
                body = b"modal-http: missing credentials for proxy authorization"
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": body})
                return
        await asgi(scope, receive, send)

    return wrapped


def _call(name: str, function: str, io_file: str) -> int:
    api = _twin()
    app = api._apps()[name]
    mod = importlib.import_module(app["module"])
    args = pickle.loads(Path(io_file).read_bytes())
    result = getattr(mod, function + _BODY)(*args, root=str(api.volume_dir))
    Path(io_file).write_bytes(pickle.dumps(result))
    return 0


def internal(argv: list[str]) -> int:
    if argv[0] == "_inspect":
        print(json.dumps(_functions(importlib.import_module(argv[1]))))
        return 0
    if argv[0] == "_run":
        return _run(argv[1])
    return _call(argv[1], argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(internal(sys.argv[1:]))
