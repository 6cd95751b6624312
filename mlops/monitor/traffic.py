"""Reading captured traffic back (a time window, bad files skipped and counted) and feedback labels.

Labels live beside the capture, one small document per request id:

    monitor/feedback/<request id>.json     {"id", "label", "time", "release"}
    monitor/thumbs/<request id>.json       {"id", "thumbs": "up"|"down", "time", "release"}

A label is the answer the request should have had; `mlops monitor` scores labelled traffic with
the eval suite's metrics, the label playing the part of a case's `expected`. A thumb is a user's
verdict on the answer (an A/B experiment's conversion metric, `mlops experiment --metric thumbs`);
it is kept apart so that "up" never becomes anyone's expected answer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from orjson import loads as _loads  # a third of json's time on 100k records (measured here)

from mlops.config import owner
from mlops.configbase import _DURATION, UNITS
from mlops.configmonitor import MAX_AGE_S
from mlops.errors import UsageError
from mlops.monitor.capture import CAPTURE_PREFIX, MAX_TEXT
from mlops.monitor.tally import COUNTERS_PREFIX, FIELDS, LOST
from mlops.registry.store import Store

FEEDBACK_PREFIX = "monitor/feedback"
THUMBS_PREFIX = "monitor/thumbs"
THUMBS = {"up": "up", "down": "down", "+1": "up", "-1": "down", "good": "up", "bad": "down"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SPAN = re.compile(r"^(\d+)-(\d+)-")
CHUNK = 1 << 20  # bytes read at a time: a 200 MB line is never held whole
# The writer's longest record is ~60 KB (two texts of MAX_TEXT characters, escaped); a longer line
# was not written by it and is skipped, counted, without being kept.
MAX_LINE = 1 << 18
# Characters of text the window keeps in all (~64-256 MB): beyond it records keep their numbers
# and lose their text, counted (the character and embedding checks use the text that was kept).
TEXT_BUDGET = 64 << 20
MAX_COUNTERS_FILE = 1 << 20  # a side file of 60 minutes is ~10 KB


def parse_age(text: str, flag: str = "--since") -> float:
    """'24h', '30m', '7d', '90s' or a number of seconds -> seconds (mlops.yaml's duration grammar),
    at most ten years."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise UsageError(f"{flag} {text[:40]!r}: expected an age like 30m, 24h or 7d")
    age = float(m.group(1)) * UNITS[m.group(2)]
    if not age <= MAX_AGE_S:
        raise UsageError(f"{flag} {text!r}: at most 3650d (ten years)")
    return age


@dataclass
class Window:
    since: float
    until: float
    records: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0
    skipped_files: int = 0  # unreadable: mode 000, not a regular file (a FIFO), gone between list and read
    skipped_lines: int = 0  # malformed or truncated JSON, over MAX_LINE, not a record, a field of the wrong type
    text_dropped: int = 0  # records over TEXT_BUDGET: numbers kept, text not
    all_records: int = 0  # records in the window of any release (what the capture counters count)
    _text: int = 0


def _span(key: str) -> tuple[float, float] | None:
    m = _SPAN.match(key.rsplit("/", 1)[-1])
    return (int(m.group(1)) / 1000, int(m.group(2)) / 1000) if m else None


def _listing(store: Store, since: float, until: float | None) -> list[str]:
    """The capture keys that may meet [since, until]: for a window of up to a month one listing per
    UTC day (from the day before `since`: a file is named by its first record's day, and spans at
    most a flush interval, an hour), not one of all history (the controller reads a window every
    few seconds)."""
    if since <= 0 or until is None or until - since > 31 * 86400:
        return store.list(CAPTURE_PREFIX)
    day = dt.datetime.fromtimestamp(since, dt.UTC).date() - dt.timedelta(days=1)
    end = dt.datetime.fromtimestamp(until, dt.UTC).date()
    keys: list[str] = []
    while day <= end:
        keys += store.list(f"{CAPTURE_PREFIX}/{day.isoformat()}")
        day += dt.timedelta(days=1)
    return keys


def capture_keys(store: Store, since: float = 0.0, until: float | None = None) -> list[str]:
    """Capture files whose time span meets [since, until] (names carry the span: no reads)."""
    out = []
    for key in _listing(store, since, until):
        if not key.endswith(".jsonl"):
            continue
        span = _span(key)
        if span is None or (span[1] >= since - 1 and (until is None or span[0] <= until + 1)):
            out.append(key)
    return out


class Unreadable(Exception):
    pass


def _chunks(store: Store, key: str) -> Iterator[bytes]:
    """A stored object in CHUNK pieces. A directory store's file is opened without blocking (a FIFO
    named *.jsonl answers at once) and read only when it is a regular file; S3 streams the object."""
    path = store.local_path(key)
    if path is None:  # an object store: streamed where it can (S3), else the object
        stream = getattr(store, "iter_chunks", None)
        pieces = stream(key, CHUNK) if stream is not None else None
        if pieces is None:
            blob = None if stream is not None else store.get(key)
            if blob is None:
                raise Unreadable("gone")
            pieces = iter([blob.data])
        yield from pieces
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:  # gone, mode 000, a link loop
        raise Unreadable(e.strerror or str(e)) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("not a regular file")
        while chunk := os.read(fd, CHUNK):
            yield chunk
    except OSError as e:
        raise Unreadable(e.strerror or str(e)) from e
    finally:
        os.close(fd)


def _lines(chunks: Iterator[bytes], w: Window) -> Iterator[bytes]:
    """Lines of at most MAX_LINE bytes; a longer one is skipped (counted) as it streams by."""
    buf = b""
    over = False  # inside a line already longer than MAX_LINE
    for chunk in chunks:
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if over:
                if not last:
                    over = False
                continue
            if buf:
                part, buf = buf + part, b""
            if len(part) > MAX_LINE:
                w.skipped_lines += 1
                over = last
            elif last:
                buf = part
            else:
                yield part
    if buf:
        yield buf  # a last line without its newline: a truncated write, the parser decides


_NUM, _INT, _STR, _NONE = {int, float}, {int}, {str}, {type(None)}
# The type of every field `mlops monitor` reads (orjson parses no NaN or Infinity: numbers are finite).
_TYPES: dict[str, frozenset[type]] = {
    "id": frozenset(_STR),
    "time": frozenset(_NUM),
    "latency_s": frozenset(_NUM | _NONE),
    **dict.fromkeys(
        ("status", "prompt_len", "output_len", "prompt_tokens", "completion_tokens", "max_tokens", "dropped_before"),
        frozenset(_INT | _NONE),
    ),
    **dict.fromkeys(
        ("release", "route", "finish_reason", "prompt", "output", "error", "source", "user", "model"),
        frozenset(_STR | _NONE),
    ),
}


def _valid(rec: Any) -> bool:
    """A record `mlops monitor` can count: an id, a time, and every field it reads of its type
    (`True` is not a status: bool is not int here)."""
    if type(rec) is not dict or "id" not in rec or "time" not in rec:
        return False
    for k, v in rec.items():  # one pass over the record's own keys (the profile's hot spot)
        allowed = _TYPES.get(k)
        if allowed is not None and type(v) not in allowed:
            return False
    return True


def _keep_text(rec: dict[str, Any], w: Window) -> None:
    """Texts cut at MAX_TEXT (a file not written by this writer), then the window's budget."""
    n = 0
    for k in ("prompt", "output"):
        v = rec.get(k)
        if v is not None:
            if len(v) > MAX_TEXT:
                rec[k] = v = v[:MAX_TEXT]
            n += len(v)
    if n and w._text + n > TEXT_BUDGET:
        rec.pop("prompt", None)
        rec.pop("output", None)
        w.text_dropped += 1
    else:
        w._text += n


def _records(lines: Iterator[bytes], w: Window) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = _loads(line)
        except ValueError:  # orjson.JSONDecodeError is a ValueError too
            w.skipped_lines += 1
            continue
        if not _valid(rec):
            w.skipped_lines += 1
            continue
        yield rec


def read_records(store: Store, key: str, w: Window) -> Iterator[dict[str, Any]]:
    """Valid records of one capture file (raises Unreadable)."""
    return _records(_lines(_chunks(store, key), w), w)


def load_window(
    store: Store,
    since: float,
    until: float | None = None,
    release: str | None = None,
    model: str | None = None,
    models: Sequence[str] = (),
) -> Window:
    """Every captured request with since <= time <= until (and of `release`, of `model`, when
    given: a record names its model, or, written before records did, its release id does, among
    the deployed `models`)."""
    w = Window(since, until if until is not None else time.time())
    mine = _of_model(model, models)
    for key in capture_keys(store, since, w.until):
        try:
            for rec in read_records(store, key, w):
                if since <= rec["time"] <= w.until:
                    w.all_records += 1
                    if (release is None or rec.get("release") == release) and mine(rec):
                        _keep_text(rec, w)
                        w.records.append(rec)
        except Unreadable:
            w.skipped_files += 1
            continue
        w.files += 1
    w.records.sort(key=lambda r: r["time"])
    return w


def _of_model(model: str | None, models: Sequence[str]) -> Callable[[dict[str, Any]], bool]:
    if model is None:
        return lambda rec: True
    names = list(models) or [model]

    def mine(rec: dict[str, Any]) -> bool:
        if "model" in rec:
            return bool(rec["model"] == model)
        return owner(names, str(rec.get("release") or "")) == model

    return mine


@dataclass
class Counts:
    """What the capture writers counted in a window (mlops/monitor/tally.py), summed over writers.
    `unwritten`: answered, neither written nor counted lost, by a writer silent for `stale_s`
    (a server killed before it flushed); a live server's queue is not counted."""

    totals: dict[str, int]
    unwritten: int
    writers: int
    last_error: str | None
    skipped_files: int


def load_counts(store: Store, since: float, until: float, stale_s: float) -> Counts | None:
    """The capture counters of the minutes in [since, until], or None when no writer left any."""
    totals = dict.fromkeys(FIELDS, 0)
    writers: set[str] = set()
    newest, last_error, skipped, unwritten = -1.0, None, 0, 0
    day = dt.datetime.fromtimestamp(since, dt.UTC).date()
    end = dt.datetime.fromtimestamp(until, dt.UTC).date()
    keys = []
    if (end - day).days <= 31:  # one listing per day of the window, not of all history
        while day <= end:
            keys += store.list(f"{COUNTERS_PREFIX}/{day.isoformat()}")
            day += dt.timedelta(days=1)
    else:  # a long window: one listing, filtered by the day in each key
        first, last = day.isoformat(), end.isoformat()
        keys = [k for k in store.list(COUNTERS_PREFIX) if first <= k.split("/")[-2] <= last]
    for key in keys:
        if not key.endswith(".json"):
            continue
        try:
            data = b""
            for chunk in _chunks(store, key):
                data += chunk
                if len(data) > MAX_COUNTERS_FILE:
                    raise Unreadable("too large")
            doc = json.loads(data)
            updated = doc.get("updated")
            if not isinstance(updated, int | float):
                raise ValueError("updated")
            mine = dict.fromkeys(FIELDS, 0)
            for minute, b in doc["minutes"].items():
                if since <= float(minute) <= until:
                    for k in FIELDS:
                        v = b.get(k, 0)
                        if type(v) is not int or v < 0:
                            raise ValueError(k)
                        mine[k] += v
        except (Unreadable, ValueError, TypeError, KeyError, AttributeError):
            skipped += 1
            continue
        if not mine["answered"]:
            continue
        writers.add(str(doc.get("writer")))
        for k, v in mine.items():
            totals[k] += v
        if time.time() - updated > stale_s:
            unwritten += max(0, mine["answered"] - mine["captured"] - sum(mine[k] for k in LOST))
        if isinstance(doc.get("last_error"), str) and updated > newest:
            newest, last_error = updated, doc["last_error"]
    if not writers and not skipped:
        return None
    return Counts(totals, unwritten, len(writers), last_error, skipped)


def find_request(store: Store, request_id: str) -> dict[str, Any] | None:
    """The captured record with this id (newest files first; a byte search before any parse).
    Unreadable files (mode 000, a FIFO) are passed over: they hold nobody's label."""
    needle = json.dumps(request_id).encode()
    w = Window(0, 0)
    for key in reversed(capture_keys(store)):
        try:
            for line in _lines(_chunks(store, key), w):
                if needle in line:
                    with contextlib.suppress(ValueError):
                        rec = _loads(line)
                        if _valid(rec) and rec.get("id") == request_id:
                            return dict(rec)
        except Unreadable:
            continue
    return None


def _captured(store: Store, request_id: str, sample_rate: float) -> dict[str, Any]:
    if not _ID.match(request_id):
        raise UsageError(f"request id {request_id!r} is not a valid id (letters, digits, '_.:-', up to 128)")
    rec = find_request(store, request_id)
    if rec is None:
        hint = f"; monitor.sample_rate {sample_rate:g} captures only part of the traffic" if sample_rate < 1 else ""
        raise UsageError(f"unknown request id {request_id!r}: no captured request has it{hint}")
    return rec


def add_feedback(store: Store, request_id: str, label: str, sample_rate: float = 1.0) -> dict[str, Any]:
    """Attach `label` to a captured request; an id nobody captured is refused, named."""
    rec = _captured(store, request_id, sample_rate)
    doc = {"id": request_id, "label": label, "time": time.time(), "release": rec.get("release")}
    store.put(f"{FEEDBACK_PREFIX}/{request_id}.json", json.dumps(doc).encode())
    return doc


def add_thumbs(store: Store, request_id: str, thumbs: str, sample_rate: float = 1.0) -> dict[str, Any]:
    """A user's thumbs up or down on a captured request (the last one given counts)."""
    verdict = THUMBS.get(thumbs.strip().lower())
    if verdict is None:
        raise UsageError(f"--thumbs {thumbs!r}: up or down")
    rec = _captured(store, request_id, sample_rate)
    doc = {"id": request_id, "thumbs": verdict, "time": time.time(), "release": rec.get("release")}
    store.put(f"{THUMBS_PREFIX}/{request_id}.json", json.dumps(doc).encode())
    return doc


def load_thumbs(store: Store) -> dict[str, dict[str, Any]]:
    """Thumbs by request id (unreadable files are ignored, as labels are)."""
    out: dict[str, dict[str, Any]] = {}
    for key in store.list(THUMBS_PREFIX):
        blob = store.get(key)
        try:
            doc = json.loads(blob.data) if blob is not None else None
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and doc.get("thumbs") in ("up", "down"):
            out[doc["id"]] = doc
    return out


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
