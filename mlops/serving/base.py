"""The seam between the server and what generates text (as httpx's `_transports/base.py`).

The server, the release pool and shadow traffic only ever `submit` a `GenRequest` and read a few
gauges; how tokens are made is the engine's business. Two implementations, chosen by
`deploy.engine` through the lazy table in `mlops.plugins`:

    builtin  mlops/serving/engine.py       continuous batching in this process (sub-second start)
    vllm     mlops/serving/vllm_engine.py  vLLM's OpenAI server as a child process, over HTTP

An engine delivers each text piece to `req.sink` as it is made, then `None`; or, when the caller
set `req.on_done` instead, calls it once at the end. Errors go in `req.error`, never raised from
the engine's own threads. Adding an engine: one module with a class that fits `Engine` and is
built by `EngineFactory`, plus one line in `mlops.plugins.ENGINES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mlops.serving.genrequest import GenRequest


class Engine(Protocol):
    model_dir: Path
    # Counters for /metrics (an engine that has no decode steps of its own leaves them at 0).
    steps: int
    step_rows: int
    prefills: int
    requests_done: int

    def check(self, req: GenRequest) -> None:
        """Raise BadRequest unless `req` can be served (the server answers 400); sets `prompt_ids`."""
        ...

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue `req` (checked first unless `prompt_ids` is set); raise BadRequest, Overloaded when
        full, EngineClosed once `stop_accepting` was called."""
        ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def busy(self) -> int:
        """Requests queued or being generated."""
        ...

    @property
    def closed(self) -> bool: ...

    def stop_accepting(self) -> None: ...

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let those held finish (bounded), then free everything."""
        ...


class EngineFactory(Protocol):
    def __call__(
        self, model_dir: str | Path, max_batch_size: int = ..., max_queue: int = ..., threads: int | None = ...
    ) -> Engine: ...
