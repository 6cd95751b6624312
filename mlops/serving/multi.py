"""One server for several deployed models: the request's `model` field picks the model.

Each deployed model keeps the whole single-model server (its own pool following its own state in
the registry, canary, shadow, live stats, capture): this app only reads a request's `model` (or, for
a pin, the release id's model) and hands the request, body replayed, to that model's app. A model
that is not served answers 404 in OpenAI's error shape, listing the served ones. So a rollout, a
canary or a rollback of one model never touches the engines or the counters of another.

    GET  /v1/models              every deployed model and the releases it routes to
    GET  /health                 {"status", "models": {name: stages, routing, state_version, loaded}}
    GET  /v1/mlops/stats, /metrics   one model's (?model=NAME; needed only with several)
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.config import owner
from mlops.serving.http import HEADER, error
from mlops.serving.pool import ReleasePool

GENERATE = ("/v1/completions", "/v1/chat/completions")


class ModelRouter:
    """The ASGI app in front of one app per deployed model (file order: the first is the default
    for what names no model, when only one is served)."""

    def __init__(
        self, apps: Mapping[str, ASGIApp], pools: Mapping[str, ReleasePool], api_key: str | None, max_body: int
    ) -> None:
        self.apps = dict(apps)
        self.pools = dict(pools)
        self.names = list(self.apps)
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None:
            return True
        got = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(got, self.expected)

    def _unknown(self, name: object) -> Response:
        served = ", ".join(self.names)
        if not name:
            return error(400, f"name a model: one of {served}", "invalid_request_error", param="model")
        msg = f"model {str(name)[:200]!r} is not served (serving: {served})"
        return error(404, msg, "invalid_request_error", code="model_not_found", param="model")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.apps[self.names[0]](scope, receive, send)
            return
        path = scope["path"]
        if path in GENERATE and scope["method"] == "POST":
            await self._generate(scope, receive, send)
        elif path == "/v1/models":
            await self._models(scope, receive, send)
        elif path == "/health":
            await self._health(scope, receive, send)
        else:  # one model's stats and metrics: ?model=NAME
            name = Request(scope).query_params.get("model")
            model = owner(self.names, name) if name else self.names[0] if len(self.names) == 1 else None
            if model is None:
                await self._unknown(name)(scope, receive, send)
                return
            await self.apps[model](scope, receive, send)

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            more = msg.get("more_body", False)
            if size > self.max_body:  # the model's app answers 413: let it read what is left
                break
        body = b"".join(chunks)
        name: object = None
        if not more:
            try:
                doc = json.loads(body)
                name = doc.get("model") if isinstance(doc, dict) else None
            except ValueError:
                name = None  # the model's app says what is wrong with the body
        if not name:
            pin = dict(scope.get("headers") or []).get(HEADER.encode(), b"").decode("latin-1")
            name = pin or None
        if name is None and len(self.names) == 1:
            model: str | None = self.names[0]
        else:
            model = owner(self.names, str(name)) if isinstance(name, str) else None
        if model is None:
            if more or not isinstance(name, str | None):
                model = self.names[0]  # too large or malformed: any model's app refuses it alike
            else:
                await self._unknown(name)(scope, receive, send)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": more}
            return await receive()

        await self.apps[model](scope, replay, send)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            resp = error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
            await resp(scope, receive, send)
            return
        data: list[dict[str, Any]] = []
        for name in self.names:
            ids = [name, *sorted(self.pools[name].state().referenced())]
            data += [{"id": i, "object": "model", "created": 0, "owned_by": "mlops", "root": name} for i in ids]
        await JSONResponse({"object": "list", "data": data})(scope, receive, send)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        models = {}
        for name, pool in self.pools.items():
            st = pool.state()
            models[name] = {
                "state_version": st.version,
                "latest_version": pool.latest().version,
                **pool.freshness(),
                "stages": st.stages,
                "routing": st.routing,
                "shadow": st.shadow,
                "loaded": pool.loaded(),
            }
        await JSONResponse({"status": "ok", "models": models})(scope, receive, send)
