"""Traffic capture: an ASGI middleware copies each sampled exchange, a background thread writes them.

On the request path the middleware only keeps the raw request and response bytes (a reference to
each chunk, no parsing) and drops them on a bounded queue; when the queue is full the exchange is
dropped and counted, never waited for. The writer thread parses, builds the record and writes a
batch as one append-only JSONL file under the registry's store:

    monitor/capture/<UTC date>/<first ms>-<last ms>-<source>-<uuid>.jsonl

File names carry their time span, so `mlops monitor --since` lists a window without reading the
rest. The record is mlops/monitor/record.py's. The same middleware wraps the local server and
the Modal gateway, so both paths write the same records.

Bounded by design: a text is cut at MAX_TEXT characters (`prompt_len`/`output_len` keep the
original length, `text_cut` says it was cut); a refused request (4xx) keeps metadata only; the
queue holds at most `queue_size` requests and QUEUE_BYTES of bodies. Each record is encoded on its
own (a lone surrogate becomes U+FFFD), so one bad record never costs another. Every request
answered is captured or counted lost with the reason (mlops/monitor/tally.py).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import errno
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.config import Loaded, MonitorCfg, owner
from mlops.configmonitor import NOT_CAPTURED
from mlops.monitor.record import MAX_BODY, MAX_TEXT, Exchange, encode, to_record

__all__ = ["MAX_TEXT", "CaptureMiddleware", "CaptureWriter", "Exchange", "to_record", "wrap", "wrap_with"]
from mlops.monitor.tally import Tally
from mlops.redact import redact
from mlops.registry.store import Store

log = logging.getLogger("mlops.monitor")
CAPTURE_PREFIX = "monitor/capture"
PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
QUEUE_BYTES = 64 << 20  # bodies waiting for the writer, at most: a burst of 1 MB bodies is dropped, counted
RELEASE_HEADER = b"x-mlops-release"
USER_HEADER = b"x-mlops-user"
_SKIP = [(k.encode(), v.encode()) for k, v in NOT_CAPTURED.items()]
_STOP = object()


def chunk_key(first: float, last: float, source: str) -> str:
    day = dt.datetime.fromtimestamp(first, dt.UTC).strftime("%Y-%m-%d")
    return f"{CAPTURE_PREFIX}/{day}/{int(first * 1000)}-{int(last * 1000)}-{source}-{uuid.uuid4().hex[:12]}.jsonl"


class CaptureWriter:
    """A bounded queue and one daemon thread that writes batches; `close()` flushes what is left.
    `tally` counts every request answered: captured, or lost with the reason."""

    def __init__(
        self,
        store: Store,
        *,
        mode: str = "full",
        template: str = "{input}",
        batch_size: int = 1000,
        flush_interval: float = 5.0,
        queue_size: int = 10000,
        source: str = "local",
        models: Mapping[str, str] | None = None,
    ) -> None:
        self.store, self.mode, self.template, self.source = store, mode, template, source
        # deployed model -> its prompt template: a record names the model whose release answered
        # (one model: always that one), and a chat turn is rendered with that model's template
        self.models = dict(models or {})
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.tally = Tally(source, uuid.uuid4().hex[:12])
        self.submitted = self.dropped = self.written = self.files = self.failed_writes = self.encode_errors = 0
        self._bytes = 0  # body bytes queued (QUEUE_BYTES)
        self._bytes_lock = threading.Lock()
        self._closed = False
        self._warned: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlops-capture")
        self._thread.start()
        atexit.register(self.close)  # `mlops serve` ends on Ctrl-C: what is queued still lands

    def model_of(self, release: str) -> str | None:
        """The deployed model a release id belongs to (its id starts with the model's name)."""
        if len(self.models) == 1:
            return next(iter(self.models))
        return owner(list(self.models), release) if release else None

    def skipped(self, t: float) -> None:
        """A request answered but left out by the sample rate."""
        self.tally.add(t, "answered")
        self.tally.add(t, "sample")

    def submit(self, ex: Exchange) -> None:
        self.tally.add(ex.time, "answered")
        size = ex.size
        with self._bytes_lock:
            room = self._bytes + size <= QUEUE_BYTES
            if room:
                self._bytes += size
        try:
            if not room:
                raise queue.Full
            self.q.put_nowait(ex)
            self.submitted += 1
        except queue.Full:
            if room:
                with self._bytes_lock:
                    self._bytes -= size
            self.dropped += 1
            self.tally.add(ex.time, "queue_full")

    def _warn(self, what: str, e: BaseException) -> None:
        """One line per kind of failure a minute: a full disk must not flood serve's log."""
        now = time.monotonic()
        if now - self._warned.get(what, -60.0) >= 60.0:
            self._warned[what] = now
            log.warning("capture: %s: %s", what, redact(str(e)))

    def _run(self) -> None:
        batch: list[tuple[float, bytes]] = []
        started = last_count = time.monotonic()
        while True:
            wait = self.flush_interval if not batch else max(0.0, started + self.flush_interval - time.monotonic())
            try:
                item = self.q.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._write(batch)
                self._write_counts()
                return
            if item is not None:
                with self._bytes_lock:
                    self._bytes -= item.size
                try:  # one record at a time: a record that cannot be encoded costs no other
                    model = self.model_of(item.release)
                    template = self.models.get(model or "", self.template)
                    rec = to_record(item, self.mode, template, self.source, model)
                    batch.append((item.time, encode(rec)))
                except Exception as e:  # a capture must never take the writer down
                    self.encode_errors += 1
                    self.tally.add(item.time, "encode")
                    self._warn("could not record a request", e)
                if len(batch) == 1:
                    started = time.monotonic()
            if batch and (len(batch) >= self.batch_size or time.monotonic() - started >= self.flush_interval):
                self._write(batch)
                batch = []
                last_count = time.monotonic()
            elif self.tally.dirty and time.monotonic() - last_count >= self.flush_interval:
                self._write_counts()  # sampled-out and dropped requests are counted without a batch
                last_count = time.monotonic()

    def _write(self, batch: list[tuple[float, bytes]]) -> None:
        if not batch:
            return
        key = chunk_key(batch[0][0], batch[-1][0], self.source)
        data = b"".join(line for _, line in batch)
        ok = False
        for attempt in range(3):  # storage hiccups: a few tries, then the batch is counted as lost
            try:
                self.store.put(key, data)
                ok = True
                break
            except Exception as e:
                self.tally.last_error = _why(e)
                self._warn("writing a batch failed (3 tries, then counted lost)", e)
                if attempt < 2:
                    time.sleep(0.2 * (attempt + 1))
        if ok:
            self.written += len(batch)
            self.files += 1
        else:
            self.failed_writes += len(batch)
        for t, _ in batch:
            self.tally.add(t, "captured" if ok else "write")
        self._write_counts()

    def _write_counts(self) -> None:
        try:
            self.tally.flush(self.store)
        except Exception as e:  # kept in memory: written with the next batch or tick
            self._warn("writing the capture counters failed", e)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self.q.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        atexit.unregister(self.close)

    def counts(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "dropped": self.dropped,
            "written": self.written,
            "files": self.files,
            "failed_writes": self.failed_writes,
            "encode_errors": self.encode_errors,
        }


def _why(e: BaseException) -> str:
    """A write error without its path (a path may come from `${VAR}`): `No space left on device`."""
    cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"disk full ({cause.strerror})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return redact(str(e))[:200]


class CaptureMiddleware:
    """Pure ASGI: copies sampled completions/chat exchanges to the writer; everything else passes by."""

    def __init__(self, app: ASGIApp, writer: CaptureWriter, sample_rate: float = 1.0) -> None:
        self.app, self.writer, self.sample_rate = app, writer, sample_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # flush what is queued before the server reports it has stopped
            return await self.app(scope, receive, self._flush_at_shutdown(send))
        route = PATHS.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if route is None or any(h in _SKIP for h in scope.get("headers", [])):  # mlops's own evals and canary
            return await self.app(scope, receive, send)
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            try:
                return await self.app(scope, receive, send)
            finally:
                self.writer.skipped(time.time())  # answered, left out on purpose: counted as such
        t0, wall = time.perf_counter(), time.time()
        req: list[bytes] = []
        resp: list[bytes] = []
        sizes = [0, 0]
        meta: dict[str, Any] = {"status": 0, "release": ""}

        async def recv() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                body = msg.get("body", b"")
                sizes[0] += len(body)
                if sizes[0] <= MAX_BODY:
                    req.append(body)
                else:
                    req.clear()  # a body this large is not parsed: keep only its size
            return msg

        async def snd(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                meta["status"] = msg["status"]
                for k, v in msg.get("headers", []):
                    if k == RELEASE_HEADER:
                        meta["release"] = v.decode("latin-1")
            elif msg["type"] == "http.response.body" and sizes[1] < MAX_BODY:
                body = msg.get("body", b"")
                resp.append(body)
                sizes[1] += len(body)
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            status = int(meta["status"] or 500)  # an app that raised before answering: a server error
            user = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == USER_HEADER), "")
            ex = Exchange(
                wall, time.perf_counter() - t0, route, status, str(meta["release"]), req, resp, sizes[0], user
            )
            self.writer.submit(ex)

    def _flush_at_shutdown(self, send: Send) -> Send:
        async def snd(msg: Message) -> None:
            if msg["type"] == "lifespan.shutdown.complete":
                await run_in_threadpool(self.writer.close)
            await send(msg)

        return snd


def wrap_with(
    app: ASGIApp, store: Store, monitor: MonitorCfg, template: str, source: str, models: Mapping[str, str] | None = None
) -> ASGIApp:
    """`app` with capture as `monitor` says (unchanged when it is off). For servers that have no
    `Loaded` at hand: the Modal gateway passes the storage, the `monitor:` section and the template
    it was deployed with, and `source="gateway"`."""
    if not monitor.enabled or monitor.sample_rate <= 0:
        return app
    writer = CaptureWriter(
        store,
        mode=monitor.capture,
        template=template,
        batch_size=monitor.batch_size,
        flush_interval=monitor.flush_interval,
        queue_size=monitor.queue_size,
        source=source,
        models=models,
    )
    return CaptureMiddleware(app, writer, monitor.sample_rate)


def wrap(app: ASGIApp, loaded: Loaded, store: Store, source: str = "local") -> ASGIApp:
    """The serving hook: `app` with capture as `monitor:` in mlops.yaml configures it.
    The writer flushes what is queued when the process exits (atexit: `mlops serve` turns SIGTERM
    into SystemExit, see serving/runner.py), or on `writer.close()`."""
    name = loaded.cfg.deploy.model  # the model's own view (mlops.config.narrow): one app per model
    template = loaded.cfg.models[name].prompt
    return wrap_with(app, store, loaded.cfg.monitor, template, source, {name: template})
