"""The HTTP edge of the local server: OpenAI-style error bodies, the release header on every
response, and uvicorn's h11 protocol answering malformed or oversized requests in JSON.

uvicorn (h11) caps a request head at `h11_max_incomplete_event_size` bytes and answers anything
it cannot parse with a plain-text 400, then closes the socket with the client's bytes unread: a
client still sending a 1 MB header got a connection reset, not an answer. `LimitedH11Protocol`
answers 431 (head too large) or 400 as JSON, then reads and drops what the client is still
sending (bounded) so the client reads the answer.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlops.serving.pool import ReleasePool

HEADER = "x-mlops-release"
MAX_HEADER_BYTES = 64 * 1024  # the whole request head (line + headers); nginx's default is 8-32 KB
DISCARD_BYTES = 16 << 20  # after a protocol error, read and drop at most this much before closing
DISCARD_S = 5.0  # ... and for at most this long


def error_body(message: str, etype: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error(
    status: int,
    message: str,
    etype: str,
    release: str = "none",
    code: str | None = None,
    param: str | None = None,
    **headers: str,
) -> Response:
    body = error_body(message, etype, param, code)
    return JSONResponse(body, status_code=status, headers={HEADER: release, **headers})


class ReleaseHeader:
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


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; protocol errors answered in JSON, 431 for an oversized head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._status = 400
        self._discarded: int | None = None  # bytes dropped since the error answer; None: not discarding
        parse = self.conn.next_event

        def next_event() -> Any:
            try:
                return parse()
            except h11.RemoteProtocolError as e:  # h11 says which status fits (431 for a long head)
                self._status = e.error_status_hint
                raise

        self.conn.next_event = next_event  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        status = 431 if self._status == 431 else 400
        message = f"request head is larger than {MAX_HEADER_BYTES} bytes" if status == 431 else "malformed HTTP request"
        data = json.dumps(error_body(message, "invalid_request_error")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=data), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        # Closing now would reset a client that is still sending, and it would never read this answer.
        self._discarded = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(DISCARD_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._discarded is None:
            super().data_received(data)
            return
        self._discarded += len(data)
        if self._discarded > DISCARD_BYTES:
            self.transport.close()
