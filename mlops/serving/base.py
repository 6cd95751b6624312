"""The seam between the server and what generates text (as httpx's `_transports/base.py`).

The server, the release pool and shadow traffic only ever `submit` a `GenRequest` and read a few
gauges; how tokens are made is the engine's business. Two implementations, chosen by
`deploy.engine` through the lazy table in `mlops.plugins`:

    builtin  mlops/serving/engine.py       continuous batching in this process (sub-second start)
    vllm     mlops/serving/vllm_engine.py  vLLM's OpenAI server as a child process, over HTTP

An engine delivers each text piece to `req.sink` as it is made, then `None`; or, when the caller
set `req.on_done` instead, calls it once at the end. Errors go in `req.error`, never raised from
the engine's own threads. Adding an engine: one module with a class that fits `Engine` and is
built by `EngineFactory` (subclassing `QueuedEngine` gives it the checks, the queue and
draining), plus one line in `mlops.plugins.ENGINES`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from mlops.configvllm import VllmCfg
from mlops.errors import InfraError
from mlops.serving.chat import ChatTemplate
from mlops.serving.genrequest import BadRequest, EngineClosed, GenRequest, Overloaded, check_request


class Engine(Protocol):
    model_dir: Path

    # Counters for /metrics (an engine that has no decode steps of its own leaves them at 0; an
    # adapter release reports its base's, whose batch it shares). Read-only here: plain attributes fit.
    @property
    def steps(self) -> int: ...

    @property
    def step_rows(self) -> int: ...

    @property
    def prefills(self) -> int: ...

    @property
    def requests_done(self) -> int: ...

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
        self,
        model_dir: str | Path,
        max_batch_size: int = ...,
        max_queue: int = ...,
        threads: int | None = ...,
        vllm: VllmCfg | None = ...,
    ) -> Engine: ...


class QueuedEngine:
    """The front both engines share (as SkyPilot's base wraps `_provision`): the 400 checks, a
    bounded queue, streaming a request's pieces, draining. A subclass sets the attributes below in
    its `__init__`, keeps `_active` (requests taken off the queue and not finished), and implements
    generation and `close`."""

    model_dir: Path
    tok: Any  # a tokenizers.Tokenizer
    chat: ChatTemplate | None  # the model's chat template (None: the prompt template wraps the last user turn)
    max_positions: int
    max_batch_size: int
    # An upper bound on the text one token stands for (a vocabulary entry is never shorter than
    # what it decodes to): a prompt longer than context * this many characters cannot fit, and is
    # refused without tokenizing it (tokenizing a 1 MB prompt took seconds, holding the GIL).
    max_token_chars: int
    _queue: queue.Queue[GenRequest]
    _stop: threading.Event
    _active: int

    def _open_front(self, tok: Any, max_positions: int, max_batch_size: int, max_queue: int) -> None:
        """Set the shared state; a subclass calls it from `__init__` once `model_dir` is set and its
        tokenizer loaded."""
        self.tok = tok
        self.chat = ChatTemplate.load(self.model_dir)
        self.max_positions = max_positions
        self.max_token_chars = max([1, *map(len, tok.get_vocab(with_added_tokens=True))])
        self.max_batch_size = max_batch_size
        self._queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._active = 0
        # counters for /metrics and the benchmark
        self.steps = 0
        self.step_rows = 0  # sum of batch sizes over decode steps
        self.prefills = 0
        self.requests_done = 0

    def limit(self, vllm: VllmCfg | None) -> None:
        """Apply deploy.vllm's limits that mean the same for every engine: a shorter context
        (max_model_len) and fewer sequences at once (max_num_seqs). Call before serving."""
        if vllm is not None and vllm.max_model_len is not None:
            self.max_positions = min(self.max_positions, vllm.max_model_len)
        if vllm is not None and vllm.max_num_seqs is not None:
            self.max_batch_size = min(self.max_batch_size, vllm.max_num_seqs)

    def check(self, req: GenRequest) -> None:
        """Raise BadRequest unless `req` can be served alone; tokenizes its prompt once. Anything
        that could fail inside a batch is checked here, so one request never fails its batch.
        A chat request is rendered here with the model's template, when it has one."""
        text = None
        if req.messages is not None and self.chat is not None:
            try:
                text = self.chat.render(req.messages, req.tools)
            except Exception as e:  # the template's own raise_exception, or a turn it cannot take
                msg = f"messages cannot be rendered with the model's chat template: {type(e).__name__}: {e}"
                raise BadRequest(msg[:500], "messages") from None
        check_request(req, self.tok, self.max_positions, self.max_token_chars, text)

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue `req`; raise BadRequest when it cannot be served (see `check`), Overloaded when the
        queue is full, EngineClosed when draining."""
        if req.sink is None and req.on_done is None:
            req.sink = req.tokens.put
        if self._stop.is_set():
            raise EngineClosed("engine is draining")
        if req.prompt_ids is None:
            self.check(req)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise Overloaded("queue full") from None
        return req

    def stream(self, req: GenRequest, timeout: float) -> Iterator[str]:
        """Yield text pieces of `req` as they are generated; raise TimeoutError past `timeout`."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            try:
                if left <= 0:
                    raise queue.Empty
                piece = req.tokens.get(timeout=left)
            except queue.Empty:
                req.cancelled = True
                raise TimeoutError("generation timed out") from None
            if piece is None:
                if req.error:
                    raise InfraError(req.error)
                return
            yield piece

    def generate(self, req: GenRequest, timeout: float = 30.0) -> str:
        """The whole text of `req` (for scripts and tests; the server streams through `submit`)."""
        self.submit(req)
        return "".join(self.stream(req, timeout))

    def _finish(self, r: GenRequest, reason: str) -> None:
        """End `r` once: its finish reason, the counter, then its sink's None and `on_done`."""
        if r.finished:
            return
        r.finished = True
        if reason not in ("cancelled", "error"):
            r.finish_reason = reason
        self.requests_done += 1
        try:  # a waiter's callback that fails (its event loop closed) concerns that request alone
            if r.sink is not None:
                r.sink(None)
            if r.on_done is not None:
                r.on_done(r)
        except Exception:
            r.cancelled = True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> int:
        """Requests queued or being generated."""
        return self._queue.qsize() + self._active

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def stop_accepting(self) -> None:
        """From now on `submit` raises EngineClosed; what is queued or running still finishes."""
        self._stop.set()
