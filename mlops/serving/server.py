"""The local OpenAI-compatible endpoint: routes each request to a release and answers from its engine.

    GET  /health               liveness + what is loaded (no key needed)
    GET  /v1/models            the deployed model name and every routable release id
    POST /v1/completions       prompt -> text (stream: true answers server-sent events)
    POST /v1/chat/completions  messages -> text: the model's own chat template (all turns, system
                               prompt, tools); a model without one: the prompt template wraps the
                               last user turn
    GET  /metrics              Prometheus text
    GET  /v1/mlops/stats       per-release live stats since a time (the canary analysis reads it)

Every response carries `x-mlops-release`. Header `x-mlops-release` on a request pins a release;
`x-mlops-user` (or the OpenAI `user` field) keeps a user on one release across weights.

Load shedding: each release has a bounded queue; when it is full the answer is 503 with
`Retry-After` at once. A request that outlives `request_timeout` is answered 504 and leaves the
batch. A request routed to a release whose engine is draining (it just left the routing) is routed
again by the current state; one already queued or running finishes on the release that took it.

Hostile input costs its sender alone: the body is read within bounds and every field checked
(requests.py), the engine checks what only it can (the prompt's tokens against the context) before
the request joins a batch, and client errors are 4xx with an OpenAI-style JSON body (http.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mlops.errors import InfraError, MlopsError
from mlops.serving.base import Engine
from mlops.serving.context import Ctx, ServerOptions, overloaded, record_shadow
from mlops.serving.engine import BadRequest, EngineClosed, GenRequest, Overloaded
from mlops.serving.exposition import prometheus
from mlops.serving.http import HEADER, ReleaseHeader, error
from mlops.serving.pool import ReleasePool
from mlops.serving.requests import ClientError, check_name, gen_request, read_json, shown
from mlops.serving.responses import payload, stream
from mlops.serving.routing import pick

__all__ = ["HEADER", "ServerOptions", "create_app"]

log = logging.getLogger("mlops.serve")


class _HttpError(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _client_error(e: ClientError | BadRequest, release: str = "none") -> Response:
    if isinstance(e, BadRequest):
        return error(400, str(e), "invalid_request_error", release, param=e.param)
    etype = "not_found_error" if e.status == 404 else "invalid_request_error"
    return error(e.status, e.message, etype, release, code=e.code, param=e.param)


async def _complete(engine: Engine, req: GenRequest, timeout: float) -> str:
    """Submit `req` and wait (bounded) for its whole text: one hop back to the loop, at the end."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    req.on_done = lambda r: loop.call_soon_threadsafe(wake)
    engine.submit(req)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        req.cancelled = True  # leaves the batch at the next step
        raise
    if req.error:
        raise InfraError(req.error)
    return req.text


def create_app(pool: ReleasePool, opts: ServerOptions) -> Starlette:
    ctx = Ctx(pool, opts)
    expected = f"Bearer {opts.api_key}".encode() if opts.api_key else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def unauthorized() -> Response:
        return error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    async def health(request: Request) -> Response:
        st = pool.state()
        body = {
            "status": "ok",
            "state_version": st.version,
            "latest_version": pool.latest().version,
            **pool.freshness(),
            "stages": st.stages,
            "routing": st.routing,
            "shadow": st.shadow,
            "loaded": pool.loaded(),
        }
        return JSONResponse(body, headers={HEADER: st.stages.get("production") or "none"})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        st = pool.state()
        ids = [opts.model_name, *sorted(st.referenced())]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "mlops"} for i in ids]
        return JSONResponse({"object": "list", "data": data}, headers={HEADER: ctx.production()})

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        text = prometheus(ctx)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4", headers={HEADER: ctx.production()})

    async def stats(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        try:
            since = float(request.query_params.get("since", "0") or 0)
        except ValueError:
            return error(400, "since must be a number (unix time)", "invalid_request_error")
        body = {
            "now": time.time(),
            "state_version": pool.state().version,
            "releases": ctx.stats.window(since),
            "rejected": ctx.stats.rejected,
            "shadow": ctx.shadow.window(since),
            "shadow_pending": ctx.shadow.pending,
        }
        return JSONResponse(body, headers={HEADER: ctx.production()})

    async def resolve(request: Request, body: dict[str, Any]) -> tuple[str, bool, str | None]:
        """(release, pinned, user key) for a request, or raise ClientError (404) / _HttpError (503)."""
        st = pool.state()
        model = body.get("model") or opts.model_name
        pin = request.headers.get(HEADER)
        what = "release"
        if model != opts.model_name:
            pin, what = model, "model"
        if pin:
            pin = check_name(pin, what)  # before any lookup: a name is a store key
        if pin and pin not in st.referenced() and pool.engine(pin) is None:
            try:
                known = await asyncio.to_thread(pool.registry.manifest, pin) is not None
            except Exception as e:  # a damaged manifest or a store hiccup: no detail to the client
                log.warning("cannot look up %s: %s", shown(pin), getattr(e, "headline", type(e).__name__))
                msg = f"{what} {shown(pin)} cannot be looked up now"
                raise _HttpError(error(503, msg, "server_error", **{"retry-after": "5"})) from None
            if not known:
                msg = f"{what} {shown(pin)} does not exist (serving {opts.model_name!r})"
                raise ClientError(404, msg, "model", "model_not_found")
        key = request.headers.get("x-mlops-user") or body.get("user") or None
        release = pick(st, key, pin, next(ctx.counter))
        if release is None:
            msg = "no release is in production yet (run `mlops run`)"
            raise _HttpError(error(503, msg, "server_error", **{"retry-after": "5"}))
        return release, bool(pin), key

    async def engine_for(release: str) -> Engine:
        eng = pool.engine(release)
        if eng is None:  # only a pin to a release the state does not reference gets here
            try:
                eng = await asyncio.to_thread(pool.get, release, "request")
            except MlopsError as e:  # its headline names artifact paths: they stay in the log
                log.error("cannot serve %s: %s", release, e.headline)
                raise InfraError(f"release {release} cannot be loaded now") from None
        return eng

    async def handle(request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        if not authorized(request):
            return unauthorized()
        release = "none"
        try:
            body = await read_json(request, opts.max_body_bytes)
            gen = gen_request(body, chat, opts.prompt_template, opts.default_max_tokens)
            release, pinned, key = await resolve(request, body)
            if opts.fault is not None and opts.fault.fire(release, gen.prompt):
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                return error(500, "injected fault (MLOPS_FAULT_RELEASE)", "server_error", release)
            engine = await engine_for(release)
            if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                gen.max_tokens = min(gen.max_tokens, getattr(engine, "max_positions", gen.max_tokens))
            engine.check(gen)  # before the request joins a batch (or reaches a shadow)
        except (ClientError, BadRequest) as e:
            return _client_error(e, release)
        except _HttpError as e:
            return e.response
        except MlopsError as e:
            ctx.stats.record(release, time.perf_counter() - t0, ok=False)
            return error(503, e.headline, "server_error", release, **{"retry-after": "1"})
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return await generate(gen, release, engine, pinned, key, chat, bool(body.get("stream")), t0, usage)

    async def generate(
        gen: GenRequest,
        release: str,
        engine: Engine,
        pinned: bool,
        key: str | None,
        chat: bool,
        sse: bool,
        t0: float,
        usage: bool = False,
    ) -> Response:
        """Run a checked request on `engine` (or a release the routing moved it to) and answer."""
        st = pool.state()
        target = None if pinned else ctx.shadow.wants(st, release, key, pinned)
        shadow = None
        if target is not None and (sh_engine := pool.engine(target)) is not None:
            shadow = ctx.shadow.mirror(sh_engine, target, gen, opts.fault)
        meta = (f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}", int(time.time()), chat)
        if sse:
            return await stream(ctx, engine, gen, release, meta, t0, (shadow, target), usage)
        for attempt in range(2):
            try:
                text = await _complete(engine, gen, opts.request_timeout - (time.perf_counter() - t0))
                break
            except EngineClosed:  # its release just left the routing: the current state decides
                rerouted = None if attempt or pinned else pick(pool.state(), key, None, next(ctx.counter))
                engine_now = pool.engine(rerouted) if rerouted else None
                if engine_now is None or engine_now.closed:
                    return overloaded(ctx, release, t0, shadow, target, gen, "draining")
                release, engine = str(rerouted), engine_now
                gen.prompt_ids = None  # checked again by the engine that takes it
                gen.adapter = None  # an adapter release's view tags it again; a merged release has none
                ctx.rerouted += 1
            except Overloaded:
                return overloaded(ctx, release, t0, shadow, target, gen, "overloaded")
            except BadRequest as e:  # only after a reroute to an engine with a smaller context
                return _client_error(e, release)
            except TimeoutError:
                record_shadow(ctx, shadow, target, gen, release, None, t0, "timeout")
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                msg = f"generation took longer than {opts.request_timeout:g}s"
                return error(504, msg, "timeout", release, code="timeout")
            except MlopsError as e:
                record_shadow(ctx, shadow, target, gen, release, None, t0, e.headline)
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                return error(500, e.headline, "server_error", release)
        ctx.stats.record(release, time.perf_counter() - t0, ok=True)
        record_shadow(ctx, shadow, target, gen, release, text, t0, None)
        return JSONResponse(payload(opts.model_name, gen, text, release, meta), headers={HEADER: release})

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/v1/mlops/stats", stats),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(ReleaseHeader, pool=pool)])
    app.state.ctx = ctx
    return app
