"""The stable HTTPS endpoint: authenticates, picks a release by the routing state, forwards to its vLLM.

    modal secret create mlops-<project>-auth MLOPS_API_KEYS=<key>[,<key>...] MLOPS_VLLM_API_KEY=<random> \
        MLOPS_PROXY_TOKEN_ID=wk-... MLOPS_PROXY_TOKEN_SECRET=ws-...
    modal deploy functions/gateway.py      # ModalBackend also redeploys it whenever the code changes

Every request needs `Authorization: Bearer <key>` with a key from MLOPS_API_KEYS (or from the env
var named by mlops.yaml `deploy.server.api_key_env`, if the Secret sets it); anything else gets 401
before any state is read or any model is touched. MLOPS_VLLM_API_KEY, which every vLLM server
requires, and the Proxy Auth Token that every per-release URL requires, reach only the gateway.

An adapter release (`lora.serve: adapter`) has no app of its own: the Dict's `adapter:<release>`
names its base's app, which serves it under the release id (functions/serve.py, MLOPS_BASE).

The routing State lives in a `modal.Dict` ("state"), written by ModalBackend whenever routing
moves, with a durable copy on the Volume (Dict entries expire after 7 idle days: the gateway falls
back to the copy and puts it back). A release's URL is looked up from its app name. Both go through
a short in-memory cache, so a rollback reaches the gateway within `STATE_TTL_S`.

Several deployed models (mlops.yaml `deploy.models`) share this one gateway: each model's State
has its own Dict key ("state:<model>") and Volume copy, and a request's `model` (a model name, or
a release id: a pin, whose model its id names) picks the State it is routed by. So one model's
canary, promotion or rollback never moves another's traffic. `GET /v1/models` lists every model
and the releases it routes to; an unknown model answers 404 listing the served ones.

The gateway measures every forwarded request per release and serves the window at
`/v1/mlops/stats` (what the canary analysis reads). Those stats live in the same Dict, each
container's under its own key (mlops/serving/shared_stats.py), not in a container's memory: the
gateway scales to zero when idle (a canary bake outlasts `scaledown_window`), is replaced on every
redeploy and may run several containers, and every one of them answers with all the traffic.
In a rollout's shadow step (the State's `shadow`) it mirrors that share of production's requests
to the candidate off the request path, answering the user from production only, and keeps the
pairs the same way (mlops/serving/shared_shadow.py): `/v1/mlops/stats` carries them as
`shadow` and `shadow_pending`, as the local server's does.

With `monitor.enabled` in mlops.yaml, the gateway captures traffic as the local server does
(mlops/monitor/capture.py, `source: gateway`): each exchange, with the release that answered it,
goes off the request path to a writer thread that appends JSONL batches to the registry's
storage, flushed on shutdown. On Modal that storage must be S3 (a local path would be the
container's disk): the image carries boto3, and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_DEFAULT_REGION come from a Modal Secret named in mlops.yaml `modal.secrets`.

`create_gateway_app` is plain Starlette: tests run it under uvicorn on 127.0.0.1 against a fake
upstream; `gateway_body` builds it from a `ModalAPI`: Modal's in the container, the twin's here.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
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
from starlette.types import ASGIApp

from mlops.backends.modal_api import ModalAPI, ModalSDK
from mlops.backends.modal_settings import (
    ADAPTER_KEY,
    KEYS_ENV,
    PROXY_ID_ENV,
    PROXY_SECRET_ENV,
    VLLM_KEY_ENV,
    ModalSettings,
)
from mlops.config import owner
from mlops.registry.releases import State
from mlops.serving.routing import pick
from mlops.serving.shared_shadow import TIMEOUT_S, SharedShadow
from mlops.serving.shared_stats import SharedStats
from mlops.serving.stats import LiveStats

HEADER = "x-mlops-release"
STATE_TTL_S = 2.0  # how stale routing may be: a Dict read per container per 2 s, not per request
URL_TTL_S = 30.0  # release URLs change only on redeploy

# Upstream timeouts: a scaled-to-zero vLLM container may take minutes to answer its first request.
UPSTREAM_KEEPALIVE_S = 2.5  # below vLLM's 5 s idle keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): see lifespan
UPSTREAM_TIMEOUT = httpx.Timeout(connect=15.0, read=600.0, write=60.0, pool=60.0)
# The gateway's own function timeout must outlast the longest upstream wait, or Modal cuts a
# request that vLLM would still have answered.
GATEWAY_TIMEOUT_S = int(UPSTREAM_TIMEOUT.read or 0) + 120

app = modal.App(settings.gateway_app)

# Scaling: the stats are shared through the Dict, so the gateway may scale out (a second
# container under load, and no single point of failure) and to zero. At most one warm container:
# it only waits on upstreams (one takes a thousand requests at once), so deploy.resources.
# min_containers (meant for the GPU servers) would only buy idle CPUs; and min must never exceed
# max, or Modal refuses the deploy.
MAX_CONTAINERS = 8
MIN_CONTAINERS = min(settings.min_containers, 1, MAX_CONTAINERS)


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


StateFn = Callable[[], State]


def create_gateway_app(
    get_state: StateFn | Mapping[str, StateFn],
    upstream_url_for: Callable[[str], str | None],
    api_keys: Collection[str],
    *,
    upstream_api_key: str | None = None,
    model_name: str | None = None,
    timeout: httpx.Timeout = UPSTREAM_TIMEOUT,
    upstream_headers: Mapping[str, str] | None = None,
    stats: LiveStats | SharedStats | None = None,
    settings_digest: str | None = None,
    shadow_timeout: float = TIMEOUT_S,
) -> Starlette:
    """An OpenAI-compatible router. `get_state()` returns the routing State, `upstream_url_for(id)`
    the base URL of a release's server (or None), `api_keys` the accepted bearer keys (required:
    an empty collection is refused, so the gateway is never open by accident). Both callables
    may block; they run in the thread pool. `stats`: shared by every container (SharedStats), or
    this process's own (LiveStats, the default); the shadow step's mirrored pairs are kept alike
    (shared_shadow.py). Several deployed models: `get_state` maps each model's name to its State's
    reader, and a request's `model` picks one."""
    keys = [k.encode() for k in api_keys if k]
    states: dict[str, StateFn] = dict(get_state) if isinstance(get_state, Mapping) else {}
    names = list(states)
    one: StateFn = get_state if callable(get_state) else states[names[0]]
    if not keys:
        raise ValueError("the gateway needs at least one API key")
    counter = itertools.count()
    clients: list[httpx.AsyncClient] = []
    stats = stats if stats is not None else LiveStats()
    shadow = SharedShadow(stats, shadow_timeout)
    proxy = dict(upstream_headers or {})  # Modal-Key / Modal-Secret: per-release URLs require them
    sent = {"content-type": "application/json", "accept-encoding": "identity", **proxy}
    if upstream_api_key:
        sent["authorization"] = f"Bearer {upstream_api_key}"

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
        body = {"status": "ok"} | ({"settings": settings_digest} if settings_digest else {})
        return JSONResponse(body, headers={HEADER: "none"})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        if states:
            data = []
            for name in names:
                st = await run_in_threadpool(states[name])
                ids = [name, *sorted(st.referenced())]
                data += [{"id": i, "object": "model", "created": 0, "owned_by": "mlops", "root": name} for i in ids]
            return JSONResponse({"object": "list", "data": data}, headers={HEADER: "none"})
        st = await run_in_threadpool(one)
        ids = [*([model_name] if model_name else []), *sorted(st.referenced())]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "mlops"} for i in ids]
        return JSONResponse({"object": "list", "data": data}, headers={HEADER: st.stages.get("production") or "none"})

    def unknown(name: object) -> Response:
        served = ", ".join(names)
        if not name:
            return _error(400, f"name a model: one of {served}", "invalid_request_error")
        msg = f"model {str(name)[:200]!r} is not served (serving: {served})"
        return _error(404, msg, "invalid_request_error", code="model_not_found")

    def route(name: object, pin: str | None) -> tuple[StateFn, str | None] | Response:
        """Whose State a request is routed by, and the release it pins (if any)."""
        if not states:
            if name and name != model_name:  # naming a release as the model pins it, as locally
                pin = str(name)
            return one, pin
        model = owner(names, name) if isinstance(name, str) and name else None
        if model is None and not name and pin:
            model = owner(names, pin)
        if model is None:
            return unknown(name)
        if name and name != model:
            pin = str(name)
        if pin and owner(names, pin) != model:
            return _error(404, f"release {pin!r} is not a release of model {model!r}", "invalid_request_error")
        return states[model], pin

    async def live_stats(request: Request) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        try:
            since = float(request.query_params.get("since", "0") or 0)
        except ValueError:
            return _error(400, "since must be a number (unix time)", "invalid_request_error")
        # the releases' stats are every model's (release ids are unique); the state version is the
        # named model's (?model=NAME), or the only one's
        asked = request.query_params.get("model") or None
        if states and asked is not None and asked not in states:
            return unknown(asked)
        fn = states[asked] if asked is not None and states else one if len(names) < 2 else None
        st = await run_in_threadpool(fn) if fn is not None else State()
        live = await run_in_threadpool(shadow.live, stats, since)
        body = {"now": time.time(), "state_version": st.version if fn is not None else None}
        body |= {"releases": live["releases"], "rejected": stats.rejected}
        body |= {"shadow": live["shadow"], "shadow_pending": live["shadow_pending"]}
        return JSONResponse(body, headers={HEADER: st.stages.get("production") or "none"})

    async def release_health(request: Request) -> Response:
        """A release server's /health, for the client that deploys it (it holds no proxy token)."""
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        release = request.path_params["release"]
        base = await run_in_threadpool(upstream_url_for, release)
        if not base:
            return _error(404, f"release {release!r} is not deployed", "invalid_request_error", release)
        try:
            r = await clients[0].get(f"{base.rstrip('/')}/health", headers=proxy)
            if r.status_code == 200:  # healthy, and serving this release (an adapter: loaded into its base)
                auth = {"authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
                m = await clients[0].get(f"{base.rstrip('/')}/v1/models", headers=proxy | auth)
                listed = m.status_code == 200 and release in {d.get("id") for d in m.json().get("data", [])}
                if not listed:
                    return _error(503, f"release {release} is not loaded yet", "server_error", release)
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            return _error(502, f"release {release} did not answer ({type(e).__name__})", "server_error", release)
        return JSONResponse({"status": r.status_code}, status_code=r.status_code, headers={HEADER: release})

    async def forward(request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        routed = route(body.get("model"), request.headers.get(HEADER) or None)
        if isinstance(routed, Response):
            return routed
        get_st, pin = routed
        st = await run_in_threadpool(get_st)
        key = request.headers.get("x-mlops-user") or (str(body["user"]) if body.get("user") else None)
        n = next(counter)
        release = pick(st, key, pin, n)
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
        target = shadow.wants(st, release, key, pin is not None, n)
        mirrored = shadow.mirror(target, path, body, post) if target else None  # production answers
        body["model"] = release  # vLLM serves each release under its id
        client = clients[0]
        req = client.build_request("POST", f"{base.rstrip('/')}{path}", content=json.dumps(body).encode(), headers=sent)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            stats.record(release, time.perf_counter() - t0, ok=False)
            if mirrored:
                mirrored.answered(502, None, t0)
            return _error(502, f"release {release} did not answer ({type(e).__name__})", "server_error", release)
        out_headers = {HEADER: release}
        ok = resp.status_code < 500
        media = resp.headers.get("content-type", "application/json")
        if body.get("stream") and resp.status_code == 200:
            out_headers["cache-control"] = "no-cache"
            stats.record(release, time.perf_counter() - t0, ok=ok)  # time to first byte
            return StreamingResponse(
                mirrored.tee(resp.aiter_raw(), resp.status_code, t0) if mirrored else resp.aiter_raw(),
                status_code=resp.status_code,
                media_type=media,
                headers=out_headers,
                background=BackgroundTask(resp.aclose),
            )
        try:
            content = await resp.aread()
        except httpx.HTTPError as e:
            stats.record(release, time.perf_counter() - t0, ok=False)
            if mirrored:
                mirrored.answered(502, None, t0)
            return _error(502, f"release {release} broke off ({type(e).__name__})", "server_error", release)
        finally:
            await resp.aclose()
        stats.record(release, time.perf_counter() - t0, ok=ok)
        if mirrored:
            mirrored.answered(resp.status_code, content, t0)
        return Response(content, status_code=resp.status_code, media_type=media, headers=out_headers)

    async def post(release: str, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        """A request of the gateway's own to `release` (a mirrored copy), read whole."""
        base = await run_in_threadpool(upstream_url_for, release)
        if not base:
            raise LookupError(f"release {release} has no server")
        r = await clients[0].post(f"{base.rstrip('/')}{path}", json=payload, headers=sent)
        return r.status_code, r.content

    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # follow_redirects: Modal answers a request that waits on a cold container past ~150 s
        # with a 303 to the pending result; following it is how the answer arrives.
        # keepalive_expiry: vLLM (and the twin's stand-in) close a connection idle for 5 s, httpx's own
        # expiry is 5 s too: a request on a connection idle ~5 s raced that close and came back as a 502
        # (issue 17; a canary step failed on it). Giving up on idle connections first is always safe.
        limits = httpx.Limits(keepalive_expiry=UPSTREAM_KEEPALIVE_S)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, trust_env=False, limits=limits) as client:
            clients.append(client)
            if isinstance(stats, SharedStats):
                stats.start()
            try:
                yield
            finally:
                await shadow.close()  # before the last flush: its pending count drops to 0
                clients.clear()
                if isinstance(stats, SharedStats):  # a container scaled down keeps its rows
                    await run_in_threadpool(stats.stop)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/mlops/stats", live_stats),
        Route("/v1/mlops/releases/{release}/health", release_health),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def routing_sources(api: ModalAPI) -> tuple[StateFn | dict[str, StateFn], Callable[[str], str | None]]:
    """Cached readers of the routing State (the Dict, else its durable copy on the Volume, which
    is then put back) and of release URLs (from each release's app: nothing to expire). Several
    deployed models: a reader per model, by name."""
    s = api.settings

    def stored(key: str, path: str) -> dict[str, Any] | None:
        raw = api.dict_get(key)
        if raw is None:
            try:
                raw = json.loads(b"".join(api.volume_read(path)))
            except FileNotFoundError:
                return None  # nothing published yet
            api.dict_put(key, raw)
        return dict(raw)

    def read_state(model: str) -> State:
        raw = stored(*s.state_keys(model or None))
        if raw is None and model:
            # a second model was added to a one-model deployment: the first keeps the single-model
            # State until its next move publishes under its own key
            legacy = stored(*s.state_keys(None))
            if legacy is not None:
                st = State.from_json(legacy)
                if st.referenced() and all(owner(list(s.models), r) == model for r in st.referenced()):
                    return st
        return State.from_json(raw) if raw is not None else State()

    def release_url(rid: str) -> str | None:
        # an adapter release is served by its base's app (functions/serve.py), under its own id
        entry = api.dict_get(ADAPTER_KEY + rid)
        s = api.settings
        app = s.base_app(str(entry["base"])) if isinstance(entry, dict) and entry.get("base") else s.serve_app(rid)
        return api.web_url(app, "serve")

    state_cache = TTLCache(read_state, STATE_TTL_S)
    url_cache = TTLCache(release_url, URL_TTL_S)

    def reader(model: str) -> StateFn:
        return lambda: state_cache(model)

    if s.models:
        return {m: reader(m) for m in s.models}, url_cache
    return reader(""), url_cache


def with_capture(app: ASGIApp, s: ModalSettings, *, local_storage: bool = True) -> ASGIApp:
    """`app` with traffic capture into the registry's storage, as mlops.yaml `monitor:` says.
    `local_storage=False` (on Modal): a directory would be the container's own disk, so only an
    S3 storage is written to."""
    if not s.storage or not s.monitor_json:
        return app
    if "://" not in s.storage and not local_storage:
        print(f"gateway: no traffic capture: storage {s.storage!r} is not reachable from Modal (use s3://)")
        return app
    from mlops.configmonitor import MonitorCfg
    from mlops.monitor.capture import wrap_with
    from mlops.registry.store import open_store

    monitor = MonitorCfg.model_validate_json(s.monitor_json)
    models = dict(zip(s.models, s.prompts, strict=True)) if s.models else {s.served_model: s.prompt}
    return wrap_with(app, open_store(s.storage), monitor, s.prompt, source="gateway", models=models)


def gateway_body(api: ModalAPI, environ: Mapping[str, str] | None = None, *, local_storage: bool = True) -> ASGIApp:
    """The gateway app from the Secret's variables in `environ`; refuses to start open."""
    env = os.environ if environ is None else environ
    s = api.settings
    get_state, url_for = routing_sources(api)
    keys = parse_keys(env.get(KEYS_ENV), env.get(s.api_key_env or ""))
    upstream_key = env.get(VLLM_KEY_ENV)
    proxy_id, proxy_secret = env.get(PROXY_ID_ENV), env.get(PROXY_SECRET_ENV)
    if not keys or not upstream_key or not proxy_id or not proxy_secret:
        need = f"{KEYS_ENV}, {VLLM_KEY_ENV}, {PROXY_ID_ENV} and {PROXY_SECRET_ENV}"
        raise RuntimeError(f"the Modal Secret {s.auth_secret!r} needs {need}")
    app = create_gateway_app(
        get_state,
        url_for,
        keys,
        upstream_api_key=upstream_key,
        model_name=s.served_model,
        upstream_headers={"Modal-Key": proxy_id, "Modal-Secret": proxy_secret},
        stats=SharedStats(api.dict_put, api.dict_items),
        settings_digest=s.digest,
    )
    return with_capture(app, s, local_storage=local_storage)


@app.function(
    image=gateway_image,
    secrets=[auth_secret(), *extra_secrets()],
    env=settings.env(),
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=settings.scaledown_window,
    timeout=GATEWAY_TIMEOUT_S,
)
@modal.concurrent(max_inputs=1000)  # it only waits on upstreams: one small container takes many
@modal.asgi_app()
def gateway() -> ASGIApp:
    return gateway_body(ModalSDK(settings), local_storage=False)
