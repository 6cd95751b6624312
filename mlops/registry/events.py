"""A release's history: one object per event, and its status kept in the release index.

    releases/<release>/events/<stamp>-<random>.json   one event, written once (if-none-match)
    releases/<release>/history.json                    the list registries kept before event objects:
                                                       read (and repaired by `mlops doctor`), never appended
    index/releases/<release>.json                      also holds the release's status: the newest event
                                                       (`head`, `status`) and the last eval summary

Every appender writes a new object of its own, so concurrent writers never race on one document: no
compare-and-swap loop, no lost event. The stamp is UTC time in microseconds, sortable as text and
strictly increasing within a process (so one writer's events keep their order); the random tail
keeps two writers apart. A history reads the legacy list first (all of it predates the first event
object), then the objects in key order.

The index's status is a cache of the history: it is written after the event, and a listing that
finds an entry whose `head` is not the release's newest event key (a writer killed in between, a
registry from before event objects) rebuilds that entry from the history once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from mlops.errors import ConflictError, InfraError
from mlops.registry.damage import loads
from mlops.registry.store import Store

INDEX = "index/releases"
LEGACY = "history.json"
LEGACY_HEAD = "history.json"  # the head of a release whose only history is the legacy list
INDEX_RETRIES = 20  # the status is a cache: after this many lost races the next listing rebuilds it

_last_us = [0]
_stamp_lock = threading.Lock()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def event_prefix(release_id: str) -> str:
    return f"releases/{release_id}/events"


def _stamp() -> str:
    with _stamp_lock:
        us = _last_us[0] = max(time.time_ns() // 1000, _last_us[0] + 1)
    secs, frac = divmod(us, 1_000_000)
    return dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y%m%dT%H%M%S") + f".{frac:06d}Z"


def _order(head: str | None) -> tuple[int, str]:
    """Heads compare as: none < the legacy list < event objects (by name)."""
    if not head:
        return (0, "")
    return (1, "") if head == LEGACY_HEAD else (2, head)


def index_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """What finding and listing a release need, without reading its manifest or history."""
    lineage = manifest.get("lineage") or {}
    return {
        "id": manifest["id"],
        "model": manifest.get("model"),
        "created_at": manifest.get("created_at"),
        "fingerprint": lineage.get("fingerprint"),
        "git_sha": lineage.get("git_sha"),
    }


def write(store: Store, release_id: str, entry: dict[str, Any]) -> str:
    """Store one event as its own object; return its name (the release's new head)."""
    data = _dumps(entry)
    for _ in range(3):  # a clash needs the same microsecond and the same 48 random bits
        name = f"{_stamp()}-{secrets.token_hex(6)}.json"
        try:
            store.put(f"{event_prefix(release_id)}/{name}", data, if_none_match=True)
            return name
        except ConflictError:
            continue
    raise ConflictError(f"could not name a new event object under {event_prefix(release_id)}")


def heads(keys: Sequence[str]) -> dict[str, str]:
    """Release id -> its newest event's name (or LEGACY_HEAD), from one listing of `releases`."""
    out: dict[str, str] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[2] == "events" and parts[3].endswith(".json"):
            if _order(parts[3]) > _order(out.get(parts[1])):
                out[parts[1]] = parts[3]
        elif len(parts) == 3 and parts[2] == LEGACY:
            out.setdefault(parts[1], LEGACY_HEAD)
    return out


def event_keys(store: Store, release_id: str) -> list[str]:
    """The release's event objects, oldest first (a `.damaged` copy beside one is not an event)."""
    return [k for k in store.list(event_prefix(release_id)) if k.endswith(".json")]


def read(store: Store, release_id: str) -> list[dict[str, Any]]:
    """The legacy list, then every event object: RegistryDamaged names a file that cannot be read."""
    legacy = f"releases/{release_id}/{LEGACY}"
    blob = store.get(legacy)
    out = list(loads(blob.data, f"{store.uri}/{legacy}", list)) if blob else []
    for key in event_keys(store, release_id):
        if (blob := store.get(key)) is not None:
            out.append(loads(blob.data, f"{store.uri}/{key}", dict))
    return out


def status_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The status fields of an index entry, from a whole history."""
    evaluated = [e for e in history if e.get("event") == "evaluated"]
    return {
        "status": history[-1]["event"] if history else "registered",
        "summary": (evaluated[-1].get("detail") or {}).get("summary") if evaluated else None,
    }


def note(store: Store, release_id: str, head: str, fields: dict[str, Any]) -> None:
    """Set `fields` in the release's index entry where `head` is newer than the event they came from:
    the status against the entry's `head`, the eval summary against its own `summary_head` (an
    evaluation noted after a later event, by a slower writer, still counts).

    A compare-and-swap on a small cache entry: a lost race re-reads, and a writer that gives up (or
    is killed first) leaves a head the next listing sees is stale and rebuilds."""
    key = f"{INDEX}/{release_id}.json"
    for _ in range(INDEX_RETRIES):
        blob = store.get(key)
        if blob is None:
            return  # an entry is created from the manifest by Registry.index()
        try:
            entry = json.loads(blob.data)
        except ValueError:
            return  # a damaged entry is rebuilt from the manifest by Registry.index()
        if not isinstance(entry, dict):
            return
        new: dict[str, Any] = {}
        if _order(head) > _order(entry.get("head")):
            new = {k: v for k, v in fields.items() if k != "summary"} | {"head": head}
        if "summary" in fields and _order(head) > _order(entry.get("summary_head")):
            new |= {"summary": fields["summary"], "summary_head": head}
        if not new:
            return
        try:
            store.put(key, _dumps(entry | new), if_match=blob.etag)
            return
        except ConflictError:
            continue


def appended(store: Store, release_id: str, head: str, event: str, detail: dict[str, Any]) -> None:
    """Record a new event's status in the index (best effort: the event itself is already stored)."""
    fields = {"status": event} | ({"summary": detail.get("summary")} if event == "evaluated" else {})
    with contextlib.suppress(InfraError, ConflictError):
        note(store, release_id, head, fields)
