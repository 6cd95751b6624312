"""Reading captured traffic back (a time window, bad files skipped and counted) and feedback labels.

Labels live beside the capture, one small document per request id:

    monitor/feedback/<request id>.json     {"id", "label", "time", "release"}

A label is the answer the request should have had; `mlops monitor` scores labelled traffic with
the eval suite's metrics, the label playing the part of a case's `expected`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from orjson import loads as _loads  # a third of json's time on 100k records (measured here)

from mlops.errors import UsageError
from mlops.monitor.capture import CAPTURE_PREFIX
from mlops.registry.store import Store

FEEDBACK_PREFIX = "monitor/feedback"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SPAN = re.compile(r"^(\d+)-(\d+)-")


def parse_age(text: str) -> float:
    """'24h', '30m', '7d', '90s' or a number of seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*", text)
    if not m:
        raise UsageError(f"--since {text!r}: expected an age like 30m, 24h or 7d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}[m.group(2)]


@dataclass
class Window:
    since: float
    until: float
    records: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0
    skipped_files: int = 0  # unreadable (not UTF-8, gone between list and read)
    skipped_lines: int = 0  # malformed or truncated JSON lines, or lines that are not a record


def _span(key: str) -> tuple[float, float] | None:
    m = _SPAN.match(key.rsplit("/", 1)[-1])
    return (int(m.group(1)) / 1000, int(m.group(2)) / 1000) if m else None


def capture_keys(store: Store, since: float = 0.0, until: float | None = None) -> list[str]:
    """Capture files whose time span meets [since, until] (names carry the span: no reads)."""
    out = []
    for key in store.list(CAPTURE_PREFIX):
        if not key.endswith(".jsonl"):
            continue
        span = _span(key)
        if span is None or (span[1] >= since - 1 and (until is None or span[0] <= until + 1)):
            out.append(key)
    return out


def _records(data: bytes, w: Window) -> list[dict[str, Any]]:
    recs = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = _loads(line)
        except ValueError:  # orjson.JSONDecodeError is a ValueError too
            w.skipped_lines += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("time"), int | float) or "id" not in rec:
            w.skipped_lines += 1
            continue
        recs.append(rec)
    return recs


def load_window(store: Store, since: float, until: float | None = None, release: str | None = None) -> Window:
    """Every captured request with since <= time <= until (and of `release`, when given)."""
    w = Window(since, until if until is not None else time.time())
    for key in capture_keys(store, since, w.until):
        blob = store.get(key)
        if blob is None:
            w.skipped_files += 1
            continue
        w.files += 1
        for rec in _records(blob.data, w):
            if since <= rec["time"] <= w.until and (release is None or rec.get("release") == release):
                w.records.append(rec)
    w.records.sort(key=lambda r: r["time"])
    return w


def find_request(store: Store, request_id: str) -> dict[str, Any] | None:
    """The captured record with this id (newest files first; a byte search before any parse)."""
    needle = json.dumps(request_id).encode()
    for key in reversed(capture_keys(store)):
        blob = store.get(key)
        if blob is None or needle not in blob.data:
            continue
        for line in blob.data.splitlines():
            if needle in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("id") == request_id:
                    return rec
    return None


def add_feedback(store: Store, request_id: str, label: str, sample_rate: float = 1.0) -> dict[str, Any]:
    """Attach `label` to a captured request; an id nobody captured is refused, named."""
    if not _ID.match(request_id):
        raise UsageError(f"request id {request_id!r} is not a valid id (letters, digits, '_.:-', up to 128)")
    rec = find_request(store, request_id)
    if rec is None:
        hint = f"; monitor.sample_rate {sample_rate:g} captures only part of the traffic" if sample_rate < 1 else ""
        raise UsageError(f"unknown request id {request_id!r}: no captured request has it{hint}")
    doc = {"id": request_id, "label": label, "time": time.time(), "release": rec.get("release")}
    store.put(f"{FEEDBACK_PREFIX}/{request_id}.json", json.dumps(doc).encode())
    return doc


def load_feedback(store: Store) -> dict[str, dict[str, Any]]:
    """Labels by request id (unreadable label files are ignored: they were never acknowledged)."""
    out: dict[str, dict[str, Any]] = {}
    for key in store.list(FEEDBACK_PREFIX):
        blob = store.get(key)
        if blob is None:
            continue
        try:
            doc = json.loads(blob.data)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and isinstance(doc.get("label"), str):
            out[doc["id"]] = doc
    return out
