"""The stable HTTPS endpoint: authenticates, picks a release by the routing state, forwards to its vLLM.

    modal secret create <app>-auth MLOPS_API_KEYS=<key>[,<key>...] MLOPS_VLLM_API_KEY=<random>
    modal deploy functions/gateway.py

Every request needs `Authorization: Bearer <key>` with a key from MLOPS_API_KEYS (or from the env
var named by mlops.yaml `deploy.server.api_key_env`, if the Secret sets it); anything else gets 401
before any state is read or any model is touched. MLOPS_VLLM_API_KEY, which every vLLM server
requires, reaches only the gateway and those servers: the per-release URLs are no way around here.

The routing State lives in a `modal.Dict` ("state"), written by ModalBackend on every
compare-and-swap in the registry; release URLs live next to it ("url:<release>"). The gateway reads
both through a short in-memory cache, so a rollback reaches every container within `STATE_TTL_S`.

`create_gateway_app` is plain Starlette: tests run it under uvicorn on 127.0.0.1 against a fake
upstream; on Modal the same app is served by `@modal.asgi_app()`.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import httpx
import modal
from images import auth_secret, extra_secrets, gateway_image, settings
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlops.registry.releases import State
from mlops.serving.routing import pick

HEADER = "x-mlops-release"
STATE_TTL_S = 2.0  # how stale routing may be: a Dict read per container per 2 s, not per request
URL_TTL_S = 30.0  # release URLs change only on redeploy
VLLM_KEY_ENV = "MLOPS_VLLM_API_KEY"
KEYS_ENV = "MLOPS_API_KEYS"

# Upstream timeouts: a scaled-to-zero vLLM container may take minutes to answer its first request.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=15.0, read=600.0, write=60.0, pool=60.0)

app = modal.App(settings.gateway_app)


class TTLCache:
    """`fn(key)` remembered for `ttl` seconds; thread-safe (handlers call it from the thread pool)."""

    def __init__(self, fn: Callable[[str], Any], ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fn, self.ttl, self.clock = fn, ttl, clock
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, Any]] = {}

    def __call__(self, key: str = "") -> Any:
        now = self.clock()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        value = self.fn(key)
        if value is not None:  # a miss (say, a release deployed a moment ago) is asked again
            with self._lock:
                self._items[key] = (now, value)
        return value


def _error(status: int, message: str, etype: str, release: str = "none", code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    headers = {HEADER: release}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def parse_keys(*values: str | None) -> list[str]:
    """Keys from comma-separated env values; blanks dropped."""
    return [k.strip() for v in values if v for k in v.split(",") if k.strip()]


def create_gateway_app(
    get_state: Callable[[], State],
    upstream_url_for: Callable[[str], str | None],
    api_keys: Collection[str],
    *,
    upstream_api_key: str | None = None,
    model_name: str | None = None,
    timeout: httpx.Timeout = UPSTREAM_TIMEOUT,
) -> Starlette:
    """An OpenAI-compatible router. `get_state()` returns the routing State, `upstream_url_for(id)`
    the base URL of a release's server (or None), `api_keys` the accepted bearer keys (required:
    an empty collection is refused, so the gateway is never open by accident). Both callables
    may block; they run in the thread pool."""
    keys = [k.encode() for k in api_keys if k]
    if not keys:
        raise ValueError("the gateway needs at least one API key")
    counter = itertools.count()
    clients: list[httpx.AsyncClient] = []

    def authorized(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # compare with every key (no early exit), each in constant time
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(token.strip().encode(), k)
        return ok

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers={HEADER: "none"})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        st = await run_in_threadpool(get_state)
        ids = [*([model_name] if model_name else []), *sorted(st.referenced())]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "mlops"} for i in ids]
        return JSONResponse({"object": "list", "data": data}, headers={HEADER: st.stages.get("production") or "none"})

    async def forward(request: Request, path: str) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        st = await run_in_threadpool(get_state)
        pin = request.headers.get(HEADER) or None
        model = body.get("model")
        if model and model != model_name:  # naming a release as the model pins it, as locally
            pin = str(model)
        key = request.headers.get("x-mlops-user") or (str(body["user"]) if body.get("user") else None)
        release = pick(st, key, pin, next(counter))
        if release is None:
            return _error(503, "no release is in production yet", "server_error")
        base = await run_in_threadpool(upstream_url_for, release)
        if pin and not base and pin not in st.referenced():
            # a pin may name any deployed release (e.g. `mlops eval --release ID`), nothing else
            msg = f"release {pin!r} does not exist or is not deployed"
            return _error(404, msg, "invalid_request_error", code="model_not_found")
        if not base:
            return _error(
                503,
                f"release {release} has no server (run `mlops deploy --release {release}`)",
                "server_error",
                release,
            )
        body["model"] = release  # vLLM serves each release under its id
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if upstream_api_key:
            headers["authorization"] = f"Bearer {upstream_api_key}"
        client = clients[0]
        req = client.build_request(
            "POST", f"{base.rstrip('/')}{path}", content=json.dumps(body).encode(), headers=headers
        )
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            return _error(502, f"release {release} did not answer ({type(e).__name__})", "server_error", release)
        out_headers = {HEADER: release}
        media = resp.headers.get("content-type", "application/json")
        if body.get("stream") and resp.status_code == 200:
            out_headers["cache-control"] = "no-cache"
            return StreamingResponse(
                resp.aiter_raw(),
                status_code=resp.status_code,
                media_type=media,
                headers=out_headers,
                background=BackgroundTask(resp.aclose),
            )
        try:
            content = await resp.aread()
        except httpx.HTTPError as e:
            return _error(502, f"release {release} broke off ({type(e).__name__})", "server_error", release)
        finally:
            await resp.aclose()
        return Response(content, status_code=resp.status_code, media_type=media, headers=out_headers)

    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # follow_redirects: Modal answers a request that waits on a cold container past ~150 s
        # with a 303 to the pending result; following it is how the answer arrives.
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, trust_env=False) as client:
            clients.append(client)
            yield
            clients.clear()

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def modal_state_sources(dict_obj: Any) -> tuple[Callable[[], State], Callable[[str], str | None]]:
    """Cached readers of the routing State and release URLs from a `modal.Dict` (or any mapping
    with `.get`)."""
    state_cache = TTLCache(lambda _: State.from_json(dict_obj.get("state") or {}), STATE_TTL_S)
    url_cache = TTLCache(lambda rid: dict_obj.get(f"url:{rid}"), URL_TTL_S)
    return (lambda: state_cache()), url_cache


@app.function(
    image=gateway_image,
    secrets=[auth_secret(), *extra_secrets()],
    env=settings.env(),
    min_containers=settings.min_containers,
    scaledown_window=settings.scaledown_window,
)
@modal.concurrent(max_inputs=256)  # it only waits on upstreams: one small container takes many
@modal.asgi_app()
def gateway() -> Starlette:
    d = modal.Dict.from_name(settings.state_dict, environment_name=settings.environment, create_if_missing=True)
    get_state, url_for = modal_state_sources(d)
    keys = parse_keys(os.environ.get(KEYS_ENV), os.environ.get(settings.api_key_env or ""))
    upstream_key = os.environ.get(VLLM_KEY_ENV)
    if not keys or not upstream_key:  # refuse to start open, or unable to reach any vLLM
        raise RuntimeError(f"the Modal Secret {settings.auth_secret!r} needs {KEYS_ENV} and {VLLM_KEY_ENV}")
    return create_gateway_app(get_state, url_for, keys, upstream_api_key=upstream_key, model_name=settings.served_model)
