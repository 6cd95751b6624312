"""One captured exchange and its stored record (built on the capture writer's thread).

A record: id (the response's `id`, what `mlops feedback` takes), time, release, route, status,
latency_s, prompt/completion tokens, finish_reason, lengths, `user` (a hash of the request's user
key, when it has one), and either the text (`monitor.capture:
full`) or its sha256 (`metadata`, and every refused 4xx request). Texts are cut at MAX_TEXT
characters; `prompt_len`/`output_len` keep the original lengths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

MAX_BODY = 1 << 20  # bytes kept of one body: a capture never holds more than this per side
# Characters of prompt and output text a record keeps (README, Monitoring): drift statistics need
# the shape of a text, not all of it, and one 20 MB prompt must not cost `mlops monitor` 1.5 GB.
MAX_TEXT = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    request_bytes: int = 0  # the whole body's size (over MAX_BODY: no body kept)
    user: str = ""  # the `x-mlops-user` header (the body's `user` field is read with the body)

    @property
    def size(self) -> int:
        return sum(map(len, self.request)) + sum(map(len, self.response))


def user_id(key: str) -> str:
    """A user key as records keep it: a hash, enough to group one user's requests (A/B experiments
    by user) without storing the key a client sent."""
    return hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).hexdigest()


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


def _cut(text: str) -> tuple[str, bool]:
    return (text[:MAX_TEXT], True) if len(text) > MAX_TEXT else (text, False)


def to_record(ex: Exchange, mode: str, template: str, source: str, model: str | None = None) -> dict[str, Any]:
    """The stored form of one exchange (runs on the writer thread). `model`: the deployed model
    that answered (several deployed: `mlops monitor --model` reads only its records)."""
    body_cut = ex.request_bytes > MAX_BODY  # the middleware kept no body: nothing to parse
    try:
        req = json.loads(b"".join(ex.request) or b"{}") if not body_cut else {}
    except ValueError:
        req = {}
    req = req if isinstance(req, dict) else {}
    prompt = _prompt(req, ex.route, template)
    resp = _response(b"".join(ex.response), ex.route)
    usage = resp["usage"] if isinstance(resp["usage"], dict) else {}
    output = resp["text"]
    rec: dict[str, Any] = {
        "v": 1,
        "id": str(resp["id"] or f"req-{uuid.uuid4().hex[:16]}"),
        "time": round(ex.time, 3),
        "source": source,
        **({"model": model} if model else {}),
        "release": ex.release,
        "route": ex.route,
        "status": ex.status,
        "latency_s": round(ex.latency_s, 6),
        "stream": bool(req.get("stream")),
        "max_tokens": _int(req.get("max_tokens") or req.get("max_completion_tokens")),
        "prompt_tokens": _int(usage.get("prompt_tokens")),
        # a stream carries no usage: one event per decoded piece is the engine's token count
        "completion_tokens": _int(usage.get("completion_tokens", resp["pieces"] if ex.status == 200 else 0)),
        "finish_reason": resp["finish_reason"] if isinstance(resp["finish_reason"], str) else None,
        "prompt_len": None if body_cut else len(prompt),  # unknown: the body was over MAX_BODY
        "output_len": len(output),
    }
    if body_cut:
        rec["request_bytes"] = ex.request_bytes
    key = ex.user or (req.get("user") if isinstance(req.get("user"), str) else "")
    if key:
        rec["user"] = user_id(key)
    # a refused request (400: prompt over the context, 422...) is kept as metadata: its text may be huge
    if mode == "full" and not 400 <= ex.status < 500:
        rec["prompt"], cut_p = _cut(prompt)
        rec["output"], cut_o = _cut(output)
        if cut_p or cut_o:
            rec["text_cut"] = True
    else:
        rec["prompt_sha256"], rec["output_sha256"] = _sha(prompt), _sha(output)
    if resp["error"]:
        rec["error"] = resp["error"]
    return rec


def _int(v: Any) -> int | None:
    return v if type(v) is int else None  # a client's "max_tokens": "x" is not a count


def encode(rec: dict[str, Any]) -> bytes:
    """One JSON line. A lone surrogate (valid JSON, not encodable UTF-8) becomes U+FFFD."""
    line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
    try:
        return line.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", line).encode()
