"""What a client may send: the request body read within bounds, and its fields checked, not coerced.

Every refusal is a `ClientError` (a 4xx with an OpenAI-style JSON body) raised before the request
reaches an engine, so a hostile request costs its sender an error and nobody else anything. The
limits (documented in the README's "Serving limits" table):

    body              at most `max_body_bytes` (default 1 MiB), else 413; a declared length over
                      the limit is refused before the body is read
    JSON              a strict object: no NaN/Infinity literals; nesting too deep for the parser is 400
    prompt            a string (or a list of one string) that fits the model's context (the engine
                      checks the token count: `Engine.check`)
    messages          a non-empty list of objects with a string `role` and a string, null or list
                      of text parts `content`, at least one `user` turn; at most MAX_MESSAGES
    tools             null or a list of objects (OpenAI tool schemas), given to the chat template
    max_tokens        an integer, 1 .. the model's context; null means the model's default
    temperature       a finite number in 0 .. 2; null means 0 (greedy)
    seed              an integer in [-2^63, 2^64)
    stop              a string or a list of at most 4 strings of at most 256 characters
    n                 1 (one choice per request)
    model             a name of at most 128 characters; an unknown one is 404, echoed truncated
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request

from mlops.serving.engine import GenRequest

MAX_BODY_BYTES = 1 << 20
MAX_TEMPERATURE = 2.0  # OpenAI's documented range
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_NAME_CHARS = 128
MAX_MESSAGES = 1024  # a conversation is rendered by a template: a bound on its loop
# What a model name or release id may look like; anything else is unknown without a registry lookup
# (a name is used as a store key, so it never reaches the store unchecked).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class ClientError(Exception):
    """A request the client must change: answered `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def shown(value: object, limit: int = 40) -> str:
    """A client's value as an error message may echo it: repr'd, truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object, read at most `max_bytes` far; ClientError otherwise."""
    too_big = ClientError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_no_constants)
    except RecursionError:  # a 100k-deep `[[[...`: json's own recursion gave up, nothing else did
        raise ClientError(400, "request body is nested too deeply") from None
    except ValueError as e:  # also UnicodeDecodeError: the body is not UTF-8
        raise ClientError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    return body


def _integer(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ClientError(400, f"{key} must be an integer, got {shown(v)}", key)
    return v


def _number(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ClientError(400, f"{key} must be a finite number, got {shown(v)}", key)
    return float(v)


def gen_request(body: dict[str, Any], chat: bool, template: str, default_max_tokens: int) -> GenRequest:
    """The engine request a completion body asks for (types and ranges checked)."""
    prompt = chat_prompt(body, template) if chat else completion_prompt(body)
    max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ClientError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise ClientError(400, f"temperature must be within 0..{MAX_TEMPERATURE:g}, got {temperature:g}", "temperature")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):  # one choice per request
        raise ClientError(400, f"n must be 1 (one choice per request), got {shown(body.get('n'))}", "n")
    if not isinstance(body.get("stream", False), bool):
        raise ClientError(400, "stream must be true or false", "stream")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ClientError(400, "user must be a string", "user")
    return GenRequest(
        messages=chat_messages(body) if chat else None,
        tools=chat_tools(body) if chat else None,
        prompt=prompt,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=temperature or 0.0,
        stop=stops(body.get("stop")),
        seed=_integer(body, "seed"),
    )


def completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ClientError(400, "prompt must be a string or a list of one string", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ClientError(400, "prompt must be a string", "prompt")
    return prompt


def chat_prompt(body: dict[str, Any], template: str) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ClientError(400, "messages must be a non-empty list", "messages")
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ClientError(400, "messages need a user turn", "messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # the content-parts form
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise ClientError(400, "message content parts must be objects with a text string", "messages")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise ClientError(400, "message content must be a string", "messages")
    return template.format(input=content)


def _text(content: Any, sep: str) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # the content-parts form
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise ClientError(400, "message content parts must be objects with a text string", "messages")
        if any(p.get("type", "text") != "text" for p in content):
            raise ClientError(400, "only text content parts are supported", "messages")
        return sep.join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise ClientError(400, "message content must be a string", "messages")
    return content


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The turns as a chat template takes them, normalised as vLLM does: content a string (text
    parts joined by newlines, null as ""), an assistant's tool-call arguments parsed from JSON."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or len(msgs) > MAX_MESSAGES:
        raise ClientError(400, f"messages must be a list of at most {MAX_MESSAGES} turns", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ClientError(400, "each message must be an object with a string role", "messages")
        turn = dict(m)
        turn["content"] = _text(m.get("content"), "\n")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise ClientError(400, "tool_calls must be a list of objects", "messages")
            if not calls:  # as vLLM: an empty list keeps the template on its plain assistant path
                del turn["tool_calls"]
            else:
                turn["tool_calls"] = [_parsed_call(c) for c in calls]
        out.append(turn)
    return out


def _parsed_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ClientError(400, "a tool call needs a function with a string name", "messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ClientError(400, "a tool call's arguments must be a JSON object", "messages") from None
    return {**call, "function": {**fn, "arguments": args}}


def chat_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tool schemas as vLLM hands them to a template (its pydantic dump: these keys, in this
    order, `description` and `parameters` null when absent), so both render the same prompt."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ClientError(400, "tools must be a list of objects", "tools")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or t.get("type", "function") != "function":
            raise ClientError(400, "each tool must be a function with a string name", "tools")
        if not isinstance(fn.get("parameters"), dict | None) or not isinstance(fn.get("description"), str | None):
            raise ClientError(400, "a tool's parameters must be an object and its description a string", "tools")
        spec = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            spec["strict"] = fn["strict"]
        out.append({"type": "function", "function": spec})
    return out or None


def stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOPS
        or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise ClientError(
            400, f"stop must be a string or a list of at most {MAX_STOPS} strings of ≤{MAX_STOP_CHARS} chars", "stop"
        )
    return tuple(stop)


def check_name(name: object, what: str) -> str:
    """A model name or release id a client sent; an impossible one is 404 (never a store lookup)."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not NAME_RE.fullmatch(name) or ".." in name:
        raise ClientError(404, f"{what} {shown(name)} does not exist", "model", "model_not_found")
    return name
