"""The local OpenAI-compatible endpoint: routes each request to a release and answers from its engine.

    GET  /health               liveness + what is loaded (no key needed)
    GET  /v1/models            the deployed model name and every routable release id
    POST /v1/completions       prompt -> text (stream: true answers server-sent events)
    POST /v1/chat/completions  messages -> text (the model's prompt template wraps the last user turn)
    GET  /metrics              Prometheus text
    GET  /v1/mlops/stats       per-release live stats since a time (the canary analysis reads it)

Every response carries `x-mlops-release`. Header `x-mlops-release` on a request pins a release;
`x-mlops-user` (or the OpenAI `user` field) keeps a user on one release across weights.

Load shedding: each release has a bounded queue; when it is full the answer is 503 with
`Retry-After` at once. A request that outlives `request_timeout` is answered 504 and leaves the
batch. A request routed to a release whose engine is draining (it just left the routing) is routed
again by the current state; one already queued or running finishes on the release that took it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.errors import InfraError, MlopsError
from mlops.serving.engine import Engine, EngineClosed, GenRequest, Overloaded
from mlops.serving.faults import Fault
from mlops.serving.pool import ReleasePool
from mlops.serving.routing import pick
from mlops.serving.shadow import Shadow
from mlops.serving.stats import LiveStats

log = logging.getLogger("mlops.serve")
HEADER = "x-mlops-release"


@dataclass
class ServerOptions:
    model_name: str
    prompt_template: str = "{input}"
    request_timeout: float = 30.0
    api_key: str | None = None
    default_max_tokens: int = 16
    shadow_log: str | None = None  # JSONL file where shadow comparisons are appended
    fault: Fault | None = None  # testing hook (MLOPS_FAULT_*), see faults.py


class _HttpError(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _error(
    status: int, message: str, etype: str, release: str = "none", code: str | None = None, **headers: str
) -> Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={HEADER: release, **headers})


class _Ctx:
    def __init__(self, pool: ReleasePool, opts: ServerOptions) -> None:
        self.pool = pool
        self.opts = opts
        self.stats = LiveStats()
        self.counter = itertools.count()
        self.shadow = Shadow(opts.shadow_log, opts.request_timeout)
        self.rerouted = 0


class _ReleaseHeader:
    """Pure ASGI middleware: a response without `x-mlops-release` (404s, 405s) gets production's."""

    def __init__(self, app: ASGIApp, pool: ReleasePool) -> None:
        self.app = app
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k == HEADER.encode() for k, _ in headers):
                    prod = self.pool.state().stages.get("production") or "none"
                    headers.append((HEADER.encode(), prod.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


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
    ctx = _Ctx(pool, opts)
    expected = f"Bearer {opts.api_key}".encode() if opts.api_key else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def unauthorized() -> Response:
        return _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    def production() -> str:
        return pool.state().stages.get("production") or "none"

    async def health(request: Request) -> Response:
        st = pool.state()
        body = {
            "status": "ok",
            "state_version": st.version,
            "latest_version": pool.latest().version,
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
        return JSONResponse({"object": "list", "data": data}, headers={HEADER: production()})

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return PlainTextResponse(
            _prometheus(ctx), media_type="text/plain; version=0.0.4", headers={HEADER: production()}
        )

    async def stats(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        try:
            since = float(request.query_params.get("since", "0") or 0)
        except ValueError:
            return _error(400, "since must be a number (unix time)", "invalid_request_error")
        body = {
            "now": time.time(),
            "state_version": pool.state().version,
            "releases": ctx.stats.window(since),
            "rejected": ctx.stats.rejected,
            "shadow": ctx.shadow.window(since),
            "shadow_pending": ctx.shadow.pending,
        }
        return JSONResponse(body, headers={HEADER: production()})

    async def resolve(request: Request, body: dict[str, Any]) -> tuple[str, bool, str | None]:
        """(release, pinned, user key) for a request, or raise _HttpError (404, 503)."""
        st = pool.state()
        model = body.get("model") or opts.model_name
        pin = request.headers.get(HEADER)
        if model != opts.model_name:
            pin = str(model)
        if pin and pin not in st.referenced() and pool.engine(pin) is None:
            if await asyncio.to_thread(pool.registry.manifest, pin) is None:
                what = "release" if model == opts.model_name else "model"
                msg = f"{what} {pin!r} does not exist (serving {opts.model_name!r})"
                raise _HttpError(_error(404, msg, "invalid_request_error", code="model_not_found"))
        key = request.headers.get("x-mlops-user") or (str(body["user"]) if body.get("user") else None)
        release = pick(st, key, pin, next(ctx.counter))
        if release is None:
            msg = "no release is in production yet (run `mlops run`)"
            raise _HttpError(_error(503, msg, "server_error", **{"retry-after": "5"}))
        return release, bool(pin), key

    async def engine_for(release: str) -> Engine:
        eng = pool.engine(release)
        if eng is None:  # only a pin to a release the state does not reference gets here
            eng = await asyncio.to_thread(pool.get, release, "request")
        return eng

    async def handle(request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        if not authorized(request):
            return unauthorized()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        try:
            prompt = _chat_prompt(body, opts.prompt_template) if chat else _completion_prompt(body)
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or opts.default_max_tokens
            gen = GenRequest(
                prompt=prompt,
                max_tokens=int(max_tokens),
                temperature=float(body.get("temperature") or 0.0),
                stop=_stops(body.get("stop")),
                seed=None if body.get("seed") is None else int(body["seed"]),
            )
            if gen.max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
        except (ValueError, TypeError, KeyError) as e:
            return _error(400, f"invalid request: {e}", "invalid_request_error")
        release = "none"
        try:
            release, pinned, key = await resolve(request, body)
            if opts.fault is not None and opts.fault.fire(release):
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                return _error(500, "injected fault (MLOPS_FAULT_RELEASE)", "server_error", release)
            engine = await engine_for(release)
        except _HttpError as e:
            return e.response
        except MlopsError as e:
            ctx.stats.record(release, time.perf_counter() - t0, ok=False)
            return _error(503, e.headline, "server_error", release, **{"retry-after": "1"})
        st = pool.state()
        target = None if pinned else ctx.shadow.wants(st, release, key, pinned)
        shadow = None
        if target is not None and (sh_engine := pool.engine(target)) is not None:
            shadow = ctx.shadow.mirror(sh_engine, target, gen)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}"
        meta = (rid, int(time.time()), chat)
        if body.get("stream"):
            return await _stream(ctx, engine, gen, release, meta, t0, pinned, (shadow, target))
        for attempt in range(2):
            try:
                text = await _complete(engine, gen, opts.request_timeout - (time.perf_counter() - t0))
                break
            except EngineClosed:  # its release just left the routing: the current state decides
                rerouted = None if attempt or pinned else pick(pool.state(), key, None, next(ctx.counter))
                engine_now = pool.engine(rerouted) if rerouted else None
                if engine_now is None or engine_now.closed:
                    return _overloaded(ctx, release, t0, shadow, target, gen, "draining")
                release, engine = str(rerouted), engine_now
                ctx.rerouted += 1
            except Overloaded:
                return _overloaded(ctx, release, t0, shadow, target, gen, "overloaded")
            except TimeoutError:
                _record_shadow(ctx, shadow, target, gen, release, None, t0, "timeout")
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                msg = f"generation took longer than {opts.request_timeout:g}s"
                return _error(504, msg, "timeout", release, code="timeout")
            except MlopsError as e:
                _record_shadow(ctx, shadow, target, gen, release, None, t0, e.headline)
                ctx.stats.record(release, time.perf_counter() - t0, ok=False)
                return _error(500, e.headline, "server_error", release)
        ctx.stats.record(release, time.perf_counter() - t0, ok=True)
        _record_shadow(ctx, shadow, target, gen, release, text, t0, None)
        return JSONResponse(_payload(opts.model_name, gen, text, release, meta), headers={HEADER: release})

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
    app = Starlette(routes=routes, middleware=[Middleware(_ReleaseHeader, pool=pool)])
    app.state.ctx = ctx
    return app


def _overloaded(
    ctx: _Ctx,
    release: str,
    t0: float,
    shadow: asyncio.Future[Any] | None,
    target: str | None,
    gen: GenRequest,
    why: str,
) -> Response:
    ctx.stats.rejected += 1
    ctx.stats.record(release, time.perf_counter() - t0, ok=False)
    _record_shadow(ctx, shadow, target, gen, release, None, t0, why)
    return _error(503, f"server {why}, retry later", "server_error", release, **{"retry-after": "1"})


def _record_shadow(
    ctx: _Ctx,
    fut: asyncio.Future[Any] | None,
    target: str | None,
    gen: GenRequest,
    release: str,
    text: str | None,
    t0: float,
    error: str | None,
) -> None:
    if fut is not None and target is not None:
        ctx.shadow.record(fut, gen.prompt, release, target, text, time.perf_counter() - t0, error)


def _payload(model: str, gen: GenRequest, text: str, release: str, meta: tuple[str, int, bool]) -> dict[str, Any]:
    rid, created, chat = meta
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }
    choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
        "system_fingerprint": release,
    }


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ValueError("prompt must be a string or a list of one string")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    return prompt


def _chat_prompt(body: dict[str, Any], template: str) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list")
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("messages need a user turn")
    content = users[-1].get("content")
    if isinstance(content, list):  # the content-parts form
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError("message content must be a string")
    return template.format(input=content)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop[:4])
    raise ValueError("stop must be a string or a list of strings")


async def _stream(
    ctx: _Ctx,
    engine: Engine,
    gen: GenRequest,
    release: str,
    meta: tuple[str, int, bool],
    t0: float,
    pinned: bool,
    shadow: tuple[asyncio.Future[Any] | None, str | None],
) -> Response:
    """Server-sent events. The request is queued before the response starts, so a full queue is
    still a plain 503 and not an error event inside a 200."""
    rid, created, chat = meta
    model = ctx.opts.model_name
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    gen.sink = lambda piece: loop.call_soon_threadsafe(q.put_nowait, piece)
    try:
        engine.submit(gen)
    except Overloaded as e:
        return _overloaded(
            ctx, release, t0, shadow[0], shadow[1], gen, "draining" if isinstance(e, EngineClosed) else "overloaded"
        )

    def event(delta: str | None, finish: str | None, first: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
        else:
            choice["text"] = delta or ""
        obj = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "system_fingerprint": release,
        }
        return f"data: {json.dumps(obj)}\n\n"

    async def events() -> AsyncIterator[str]:
        ok, error = False, None
        deadline = t0 + ctx.opts.request_timeout
        try:
            if chat:
                yield event(None, None, first=True)
            while True:
                piece = await asyncio.wait_for(q.get(), max(0.0, deadline - time.perf_counter()))
                if piece is None:
                    break
                yield event(piece, None)
            if gen.error:
                raise InfraError(gen.error)
            yield event(None, gen.finish_reason)
            yield "data: [DONE]\n\n"
            ok = True
        except TimeoutError:
            error = f"generation took longer than {ctx.opts.request_timeout:g}s"
            yield f"data: {json.dumps({'error': {'message': error, 'type': 'timeout'}})}\n\n"
        except MlopsError as e:
            error = e.headline
            yield f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n"
        finally:
            gen.cancelled = not ok  # the client went away or it failed: free the batch slot
            ctx.stats.record(release, time.perf_counter() - t0, ok=ok)
            _record_shadow(ctx, shadow[0], shadow[1], gen, release, gen.text if ok else None, t0, error)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={HEADER: release, "cache-control": "no-cache"}
    )


def _prometheus(ctx: _Ctx) -> str:
    pool = ctx.pool
    st = pool.state()
    engines = pool.engines()
    lines = [ctx.stats.prometheus(pool.queue_depth(), sorted(engines)).rstrip("\n")]
    lines += [
        "# HELP mlops_state_version Version of the routing state being served.",
        "# TYPE mlops_state_version gauge",
        f"mlops_state_version {st.version}",
        "# HELP mlops_routing_weight Share of traffic (percent) routed to a release.",
        "# TYPE mlops_routing_weight gauge",
        *[f'mlops_routing_weight{{release="{r}"}} {w}' for r, w in sorted(st.routing.items())],
        "# HELP mlops_release_busy Requests queued or running, by release.",
        "# TYPE mlops_release_busy gauge",
        *[f'mlops_release_busy{{release="{r}"}} {e.busy}' for r, e in sorted(engines.items())],
        "# HELP mlops_engine_decode_steps_total Decode steps; rows/steps is the mean batch size.",
        "# TYPE mlops_engine_decode_steps_total counter",
        *[f'mlops_engine_decode_steps_total{{release="{r}"}} {e.steps}' for r, e in sorted(engines.items())],
        "# TYPE mlops_engine_decode_rows_total counter",
        *[f'mlops_engine_decode_rows_total{{release="{r}"}} {e.step_rows}' for r, e in sorted(engines.items())],
        "# HELP mlops_engine_prefills_total Prefill passes (each admits the requests that arrived).",
        "# TYPE mlops_engine_prefills_total counter",
        *[f'mlops_engine_prefills_total{{release="{r}"}} {e.prefills}' for r, e in sorted(engines.items())],
        "# HELP mlops_model_loads_total Model loads: preload (watcher) or request (on the request path).",
        "# TYPE mlops_model_loads_total counter",
        *[f'mlops_model_loads_total{{source="{s}"}} {pool.loads[s]}' for s in ("preload", "request")],
        "# HELP mlops_rerouted_total Requests routed again because their release was draining.",
        "# TYPE mlops_rerouted_total counter",
        f"mlops_rerouted_total {ctx.rerouted}",
        "# HELP mlops_shadow_requests_total Mirrored requests, by shadow release and outcome.",
        "# TYPE mlops_shadow_requests_total counter",
    ]
    for rel, (total, agreed, errors) in sorted(ctx.shadow.totals().items()):
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="agree"}} {agreed}')
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="differ"}} {total - agreed - errors}')
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="error"}} {errors}')
    return "\n".join(lines) + "\n"
