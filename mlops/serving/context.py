"""What the server's routes share: its options, live counters, and the bookkeeping of a request
that could not be answered (stats, shadow record)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from mlops.serving.engine import GenRequest
from mlops.serving.faults import Fault
from mlops.serving.http import error
from mlops.serving.pool import ReleasePool
from mlops.serving.requests import MAX_BODY_BYTES
from mlops.serving.shadow import Shadow
from mlops.serving.stats import LiveStats


@dataclass
class ServerOptions:
    model_name: str
    prompt_template: str = "{input}"
    request_timeout: float = 30.0
    api_key: str | None = None
    default_max_tokens: int = 16
    shadow_log: str | None = None  # JSONL file where shadow comparisons are appended
    fault: Fault | None = None  # testing hook (MLOPS_FAULT_*), see faults.py
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies are answered 413


class Ctx:
    def __init__(self, pool: ReleasePool, opts: ServerOptions) -> None:
        self.pool = pool
        self.opts = opts
        self.stats = LiveStats()
        self.counter = itertools.count()
        self.shadow = Shadow(opts.shadow_log, opts.request_timeout)
        self.rerouted = 0

    def production(self) -> str:
        return self.pool.state().stages.get("production") or "none"


def overloaded(
    ctx: Ctx,
    release: str,
    t0: float,
    shadow: asyncio.Future[Any] | None,
    target: str | None,
    gen: GenRequest,
    why: str,
) -> Response:
    ctx.stats.rejected += 1
    ctx.stats.record(release, time.perf_counter() - t0, ok=False)
    record_shadow(ctx, shadow, target, gen, release, None, t0, why)
    return error(503, f"server {why}, retry later", "server_error", release, **{"retry-after": "1"})


def record_shadow(
    ctx: Ctx,
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
