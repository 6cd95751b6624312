"""The local OpenAI-compatible endpoint: routes each request to a release and answers from its engine.

    GET  /health               liveness + what is loaded
    GET  /v1/models            the deployed model name and every routable release id
    POST /v1/completions       prompt -> text (stream: true answers server-sent events)
    POST /v1/chat/completions  messages -> text (the model's prompt template wraps the last user turn)
    GET  /metrics              Prometheus text
    GET  /v1/mlops/stats       per-release live stats since a time (canary analysis reads it)

Every response carries `x-mlops-release`. Header `x-mlops-release` on a request pins a release;
`x-mlops-user` (or the OpenAI `user` field) keeps a user on one release across weights.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mlops.errors import InfraError, MlopsError
from mlops.serving.engine import Engine, GenRequest, Overloaded
from mlops.serving.pool import ReleasePool
from mlops.serving.routing import pick
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


def _error(status: int, message: str, etype: str, release: str = "none", code: str | None = None, **headers: str) -> Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={HEADER: release, **headers})


class _Ctx:
    def __init__(self, pool: ReleasePool, opts: ServerOptions) -> None:
        self.pool = pool
        self.opts = opts
        self.stats = LiveStats()
        self.counter = itertools.count()
        self.shadow_lock = threading.Lock()
        self.inflight = 0


async def _collect(engine: Engine, req: GenRequest, timeout: float) -> AsyncIterator[str]:
    """Submit `req` and yield its text pieces as the engine's thread produces them."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    req.sink = lambda piece: loop.call_soon_threadsafe(q.put_nowait, piece)
    engine.submit(req)
    deadline = loop.time() + timeout
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            piece = await asyncio.wait_for(q.get(), timeout=left)
            if piece is None:
                if req.error:
                    raise InfraError(req.error)
                return
            yield piece
    finally:
        req.cancelled = True  # no-op when finished; frees the batch slot when the client went away


def create_app(pool: ReleasePool, opts: ServerOptions) -> Starlette:
    ctx = _Ctx(pool, opts)

    def authorized(request: Request) -> bool:
        if not opts.api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {opts.api_key}".encode())

    async def health(request: Request) -> Response:
        st = pool.state()
        body = {"status": "ok", "state_version": st.version, "stages": st.stages, "routing": st.routing, "loaded": pool.loaded()}
        return JSONResponse(body, headers={HEADER: st.stages.get("production") or "none"})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error")
        st = pool.state()
        ids = [opts.model_name, *sorted(st.referenced())]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "mlops"} for i in ids]
        return JSONResponse({"object": "list", "data": data}, headers={HEADER: st.stages.get("production") or "none"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(ctx.stats.prometheus(pool.queue_depth(), pool.loaded()), media_type="text/plain; version=0.0.4")

    async def stats(request: Request) -> Response:
        since = float(request.query_params.get("since", "0") or 0)
        return JSONResponse({"now": time.time(), "releases": ctx.stats.window(since), "rejected": ctx.stats.rejected})

    def resolve(request: Request, body: dict[str, Any]) -> tuple[str | None, Response | None]:
        st = pool.state()
        model = body.get("model") or opts.model_name
        pin = request.headers.get(HEADER)
        if model != opts.model_name:
            if model in st.referenced() or pool.registry.manifest(str(model)) is not None:
                pin = str(model)
            else:
                return None, _error(404, f"model {model!r} does not exist (serving {opts.model_name!r})", "invalid_request_error", code="model_not_found")
        if pin and pin not in st.referenced() and pool.registry.manifest(pin) is None:
            return None, _error(404, f"release {pin!r} does not exist", "invalid_request_error", code="model_not_found")
        key = request.headers.get("x-mlops-user") or (str(body["user"]) if body.get("user") else None)
        release = pick(st, key, pin, next(ctx.counter))
        if release is None:
            return None, _error(503, "no release is in production yet (run `mlops run`)", "server_error", **{"retry-after": "5"})
        return release, None

    async def handle(request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        if not authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error")
        try:
            body = await request.json()
            assert isinstance(body, dict)
        except Exception:
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        try:
            prompt = _chat_prompt(body, opts.prompt_template) if chat else _completion_prompt(body)
            gen = GenRequest(
                prompt=prompt,
                max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or opts.default_max_tokens),
                temperature=float(body.get("temperature") or 0.0),
                stop=_stops(body.get("stop")),
                seed=body.get("seed"),
            )
        except (ValueError, TypeError, KeyError) as e:
            return _error(400, f"invalid request: {e}", "invalid_request_error")
        release, err = resolve(request, body)
        if err is not None:
            return err
        assert release is not None
        try:
            engine = await asyncio.to_thread(pool.get, release) if release not in pool.loaded() else pool.get(release)
        except MlopsError as e:
            ctx.stats.record(release, time.perf_counter() - t0, ok=False)
            return _error(503, e.headline, "server_error", release, **{"retry-after": "1"})
        _maybe_shadow(ctx, request, body, prompt, gen, release)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}"
        created = int(time.time())
        if body.get("stream"):
            return _stream(ctx, engine, gen, release, rid, created, chat, t0)
        try:
            text = "".join([p async for p in _collect(engine, gen, opts.request_timeout)])
        except Overloaded:
            ctx.stats.rejected += 1
            return _error(503, "server overloaded, retry later", "server_error", release, **{"retry-after": "1"})
        except TimeoutError:
            ctx.stats.record(release, time.perf_counter() - t0, ok=False)
            return _error(504, f"generation took longer than {opts.request_timeout}s", "timeout", release)
        except MlopsError as e:
            ctx.stats.record(release, time.perf_counter() - t0, ok=False)
            return _error(500, e.headline, "server_error", release)
        ctx.stats.record(release, time.perf_counter() - t0, ok=True)
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens, "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": gen.finish_reason, "logprobs": None}
            payload = {"id": rid, "object": "chat.completion", "created": created, "model": opts.model_name, "choices": [choice], "usage": usage, "system_fingerprint": release}
        else:
            choice = {"index": 0, "text": text, "finish_reason": gen.finish_reason, "logprobs": None}
            payload = {"id": rid, "object": "text_completion", "created": created, "model": opts.model_name, "choices": [choice], "usage": usage, "system_fingerprint": release}
        return JSONResponse(payload, headers={HEADER: release})

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
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return app


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


def _stream(ctx: _Ctx, engine: Engine, gen: GenRequest, release: str, rid: str, created: int, chat: bool, t0: float) -> Response:
    model = ctx.opts.model_name

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            delta: dict[str, Any] = {"content": text} if text is not None else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(obj)}\n\n"

    async def events() -> AsyncIterator[str]:
        ok = False
        try:
            if chat:
                yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
            async for piece in _collect(engine, gen, ctx.opts.request_timeout):
                yield chunk(piece, None)
            yield chunk(None, gen.finish_reason)
            yield "data: [DONE]\n\n"
            ok = True
        except (TimeoutError, MlopsError, Overloaded) as e:
            yield f"data: {json.dumps({'error': {'message': str(e) or 'timeout', 'type': 'server_error'}})}\n\n"
        finally:
            ctx.stats.record(release, time.perf_counter() - t0, ok=ok)

    return StreamingResponse(events(), media_type="text/event-stream", headers={HEADER: release, "cache-control": "no-cache"})


def _maybe_shadow(ctx: _Ctx, request: Request, body: dict[str, Any], prompt: str, gen: GenRequest, release: str) -> None:
    """Mirror a share of production traffic to the shadow release; record both outputs, answer from production."""
    st = ctx.pool.state()
    shadow = st.shadow
    if not shadow.get("release") or release == shadow["release"] or request.headers.get(HEADER) or not ctx.opts.shadow_log:
        return
    share = float(shadow.get("share", 0))
    if (next(ctx.counter) % 10_000) >= share * 10_000:
        return
    target = str(shadow["release"])

    async def run() -> None:
        try:
            eng = ctx.pool.get(target)
            a = GenRequest(prompt=prompt, max_tokens=gen.max_tokens, stop=gen.stop)
            b = GenRequest(prompt=prompt, max_tokens=gen.max_tokens, stop=gen.stop)
            ta = "".join([p async for p in _collect(eng, a, ctx.opts.request_timeout)])
            tb = "".join([p async for p in _collect(ctx.pool.get(release), b, ctx.opts.request_timeout)])
            row = {"at": time.time(), "prompt": prompt, "production": release, "shadow": target, "production_output": tb, "shadow_output": ta}
        except Exception as e:  # shadow traffic must never affect the answer
            row = {"at": time.time(), "prompt": prompt, "production": release, "shadow": target, "error": str(e)}
        with ctx.shadow_lock, open(str(ctx.opts.shadow_log), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    task = asyncio.get_running_loop().create_task(run())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def api_key_from_env(name: str | None) -> str | None:
    return os.environ.get(name) if name else None
