"""Traffic capture: an ASGI middleware copies each sampled exchange, a background thread writes them.

On the request path the middleware only keeps the raw request and response bytes (a reference to
each chunk, no parsing) and drops them on a bounded queue; when the queue is full the exchange is
dropped and counted, never waited for. The writer thread parses, builds the record and writes a
batch as one append-only JSONL file under the registry's store:

    monitor/capture/<UTC date>/<first ms>-<last ms>-<source>-<uuid>.jsonl

File names carry their time span, so `mlops monitor --since` lists a window without reading the
rest. A record: id (the response's `id`, what `mlops feedback` takes), time, release, route,
status, latency_s, prompt/completion tokens, finish_reason, lengths, and either the text
(`monitor.capture: full`) or its sha256 (`metadata`). The same middleware wraps the local server
and the Modal gateway, so both paths write the same records.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import hashlib
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.config import Loaded, MonitorCfg
from mlops.configmonitor import NOT_CAPTURED
from mlops.registry.store import Store

log = logging.getLogger("mlops.monitor")
CAPTURE_PREFIX = "monitor/capture"
PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
MAX_BODY = 1 << 20  # bytes kept of one body: a capture never holds more than this per side
RELEASE_HEADER = b"x-mlops-release"
_SKIP = [(k.encode(), v.encode()) for k, v in NOT_CAPTURED.items()]
_STOP = object()


@dataclass
class Exchange:
    """One request as the request path saw it: raw bytes, parsed later on the writer thread."""

    time: float
    latency_s: float
    route: str
    status: int
    release: str
    request: list[bytes]
    response: list[bytes]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


def _prompt(req: dict[str, Any], route: str, template: str) -> str:
    if route == "chat":
        users = [m for m in req.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1].get("content") if users else ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        try:  # the server applies the model's template to a chat turn: record what the model saw
            return template.format(input=str(content or ""))
        except (KeyError, IndexError, ValueError):
            return str(content or "")
    prompt = req.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _response(body: bytes, route: str) -> dict[str, Any]:
    """id, text, finish_reason, usage and error from a JSON answer or a server-sent event stream."""
    out: dict[str, Any] = {"id": None, "text": "", "finish_reason": None, "usage": None, "error": None, "pieces": 0}
    docs: list[Any] = []
    if body.lstrip().startswith(b"data:"):
        for line in body.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                with contextlib.suppress(ValueError):
                    docs.append(json.loads(line[5:]))
    else:
        with contextlib.suppress(ValueError):
            docs.append(json.loads(body))
    parts: list[str] = []
    for d in docs:
        if not isinstance(d, dict):
            continue
        if isinstance(d.get("error"), dict):
            out["error"] = str(d["error"].get("message", ""))[:300]
        out["id"] = out["id"] or d.get("id")
        out["usage"] = d.get("usage") or out["usage"]
        for ch in d.get("choices") or []:
            piece = (
                ch.get("text")
                if route == "completions"
                else (ch.get("message") or ch.get("delta") or {}).get("content")
            )
            if piece:
                parts.append(str(piece))
                out["pieces"] += 1
            out["finish_reason"] = ch.get("finish_reason") or out["finish_reason"]
    out["text"] = "".join(parts)
    return out


def to_record(ex: Exchange, mode: str, template: str, source: str) -> dict[str, Any]:
    """The stored form of one exchange (runs on the writer thread)."""
    try:
        req = json.loads(b"".join(ex.request) or b"{}")
    except ValueError:
        req = {}
    req = req if isinstance(req, dict) else {}
    prompt = _prompt(req, ex.route, template)
    resp = _response(b"".join(ex.response), ex.route)
    usage = resp["usage"] if isinstance(resp["usage"], dict) else {}
    output = resp["text"]
    rec: dict[str, Any] = {
        "v": 1,
        "id": resp["id"] or f"req-{uuid.uuid4().hex[:16]}",
        "time": round(ex.time, 3),
        "source": source,
        "release": ex.release,
        "route": ex.route,
        "status": ex.status,
        "latency_s": round(ex.latency_s, 6),
        "stream": bool(req.get("stream")),
        "max_tokens": req.get("max_tokens") or req.get("max_completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        # a stream carries no usage: one event per decoded piece is the engine's token count
        "completion_tokens": usage.get("completion_tokens", resp["pieces"] if ex.status == 200 else 0),
        "finish_reason": resp["finish_reason"],
        "prompt_len": len(prompt),
        "output_len": len(output),
    }
    if mode == "full":
        rec["prompt"], rec["output"] = prompt, output
    else:
        rec["prompt_sha256"], rec["output_sha256"] = _sha(prompt), _sha(output)
    if resp["error"]:
        rec["error"] = resp["error"]
    return rec


def chunk_key(first: float, last: float, source: str) -> str:
    day = dt.datetime.fromtimestamp(first, dt.UTC).strftime("%Y-%m-%d")
    return f"{CAPTURE_PREFIX}/{day}/{int(first * 1000)}-{int(last * 1000)}-{source}-{uuid.uuid4().hex[:12]}.jsonl"


class CaptureWriter:
    """A bounded queue and one daemon thread that writes batches; `close()` flushes what is left."""

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
    ) -> None:
        self.store, self.mode, self.template, self.source = store, mode, template, source
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.submitted = self.dropped = self.written = self.files = self.failed_writes = 0
        self._closed = False
        self._dropped_seen = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlops-capture")
        self._thread.start()
        atexit.register(self.close)  # `mlops serve` ends on Ctrl-C: what is queued still lands

    def submit(self, ex: Exchange) -> None:
        try:
            self.q.put_nowait(ex)
            self.submitted += 1
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        batch: list[dict[str, Any]] = []
        started = 0.0
        while True:
            wait = self.flush_interval if not batch else max(0.0, started + self.flush_interval - time.monotonic())
            try:
                item = self.q.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._write(batch)
                return
            if item is not None:
                try:
                    batch.append(to_record(item, self.mode, self.template, self.source))
                except Exception as e:  # a capture must never take the writer down
                    log.warning("capture: could not record a request: %s", e)
                if len(batch) == 1:
                    started = time.monotonic()
            if batch and (len(batch) >= self.batch_size or time.monotonic() - started >= self.flush_interval):
                self._write(batch)
                batch = []

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        dropped, self._dropped_seen = self.dropped - self._dropped_seen, self.dropped
        if dropped:  # the monitor report sums these: traffic the queue could not keep
            batch[0]["dropped_before"] = dropped
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in batch)
        key = chunk_key(batch[0]["time"], batch[-1]["time"], self.source)
        for attempt in range(3):  # storage hiccups: a few tries, then the batch is counted as lost
            try:
                self.store.put(key, data.encode())
                self.written += len(batch)
                self.files += 1
                return
            except Exception as e:
                log.warning("capture: writing %s failed (%s), attempt %d of 3", key, e, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        self.failed_writes += len(batch)

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
        }


class CaptureMiddleware:
    """Pure ASGI: copies sampled completions/chat exchanges to the writer; everything else passes by."""

    def __init__(self, app: ASGIApp, writer: CaptureWriter, sample_rate: float = 1.0) -> None:
        self.app, self.writer, self.sample_rate = app, writer, sample_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # flush what is queued before the server reports it has stopped
            return await self.app(scope, receive, self._flush_at_shutdown(send))
        route = PATHS.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if route is None or (self.sample_rate < 1.0 and random.random() >= self.sample_rate):
            return await self.app(scope, receive, send)
        if any(h in _SKIP for h in scope.get("headers", [])):  # mlops's own evals and canary traffic
            return await self.app(scope, receive, send)
        t0, wall = time.perf_counter(), time.time()
        req: list[bytes] = []
        resp: list[bytes] = []
        sizes = [0, 0]
        meta: dict[str, Any] = {"status": 0, "release": ""}

        async def recv() -> Message:
            msg = await receive()
            if msg["type"] == "http.request" and sizes[0] < MAX_BODY:
                body = msg.get("body", b"")
                req.append(body)
                sizes[0] += len(body)
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
            self.writer.submit(Exchange(wall, time.perf_counter() - t0, route, status, str(meta["release"]), req, resp))

    def _flush_at_shutdown(self, send: Send) -> Send:
        async def snd(msg: Message) -> None:
            if msg["type"] == "lifespan.shutdown.complete":
                await run_in_threadpool(self.writer.close)
            await send(msg)

        return snd


def wrap_with(app: ASGIApp, store: Store, monitor: MonitorCfg, template: str, source: str) -> ASGIApp:
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
    )
    return CaptureMiddleware(app, writer, monitor.sample_rate)


def wrap(app: ASGIApp, loaded: Loaded, store: Store, source: str = "local") -> ASGIApp:
    """The serving hook: `app` with capture as `monitor:` in mlops.yaml configures it.
    The writer flushes what is queued when the process exits (atexit: `mlops serve` turns SIGTERM
    into SystemExit, see serving/runner.py), or on `writer.close()`."""
    template = loaded.cfg.models[loaded.cfg.deploy.model].prompt
    return wrap_with(app, store, loaded.cfg.monitor, template, source)
