"""The bodies of a completion: one JSON object, or server-sent events as the tokens come."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from mlops.errors import InfraError, MlopsError
from mlops.serving.base import Engine
from mlops.serving.context import Ctx, overloaded, record_shadow
from mlops.serving.engine import EngineClosed, GenRequest, Overloaded
from mlops.serving.http import HEADER

Meta = tuple[str, int, bool]  # (response id, created, chat)


def payload(model: str, gen: GenRequest, text: str, release: str, meta: Meta) -> dict[str, Any]:
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


async def stream(
    ctx: Ctx,
    engine: Engine,
    gen: GenRequest,
    release: str,
    meta: Meta,
    t0: float,
    shadow: tuple[asyncio.Future[Any] | None, str | None],
    include_usage: bool = False,
) -> Response:
    """Server-sent events; with `stream_options.include_usage` a last chunk with no choices carries
    the usage, as vLLM and OpenAI send it (the openai client counts a stream's tokens from it). The request is queued before the response starts, so a full queue is
    still a plain 503 (and a bad request a 400) and not an error event inside a 200."""
    rid, created, chat = meta
    model = ctx.opts.model_name
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    gen.sink = lambda piece: loop.call_soon_threadsafe(q.put_nowait, piece)
    try:
        engine.submit(gen)
    except Overloaded as e:
        why = "draining" if isinstance(e, EngineClosed) else "overloaded"
        return overloaded(ctx, release, t0, shadow[0], shadow[1], gen, why)

    event_object = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: str | None, finish: str | None, first: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
        else:
            choice["text"] = delta or ""
        obj = {
            "id": rid,
            "object": event_object,
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
            if include_usage:
                last = payload(model, gen, "", release, meta)
                yield f"data: {json.dumps({**last, 'object': event_object, 'choices': []})}\n\n"
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
            record_shadow(ctx, shadow[0], shadow[1], gen, release, gen.text if ok else None, t0, error)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={HEADER: release, "cache-control": "no-cache"}
    )
