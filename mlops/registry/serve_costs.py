"""Serving's cost records: what the serving containers' uptime (mlops/serving/uptime.py, in the Modal
Dict) adds up to, as `serve_gpu_hours` and dollars, for `budget.per_month.serve_gpu_hours`.

One record per container and calendar month, `costs/<YYYY-MM>/serve-<container key>.json`, holding
that container's whole time within the month so far (not a delta): collecting again rewrites it
with a total at least as large, so collecting twice, or from two machines at once, never counts a
second twice. Each write is a compare-and-swap on the record, and never lowers it (a collector that
read the Dict a moment earlier loses the race, not the time). A container that runs across a
month's end has a record in each month, split at midnight UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any

from mlops.config import Config
from mlops.errors import ConflictError
from mlops.registry.costs import KEYS, PREFIX, _gpu_price, gpu_count
from mlops.registry.store import Store
from mlops.util import now

# the Dict keys serving containers write their uptime under (mlops/serving/uptime.py writes them;
# defined here, the lower layer, so the collector need not import serving)
UPTIME = "uptime:"
TRIES = 5  # compare-and-swap rounds per record before another collector is left to finish it


def _months(start: float, end: float) -> list[tuple[str, float]]:
    """(YYYY-MM, seconds of [start, end] within it), in order."""
    out = []
    t = start
    while t < end:
        at = dt.datetime.fromtimestamp(t, dt.UTC)
        nxt = (at.replace(day=28) + dt.timedelta(days=4)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        upto = min(end, nxt.timestamp())
        out.append((at.strftime("%Y-%m"), upto - t))
        t = upto
    return out


def _key(month: str, dict_key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", dict_key.removeprefix(UPTIME))
    return f"{PREFIX}/{month}/serve-{name}.json"


def spend(cfg: Config, seconds: float, gpu: str | None) -> dict[str, float]:
    n = gpu_count(gpu)
    hours = seconds / 3600
    return {"serve_gpu_hours": hours * n, "usd": hours * n * _gpu_price(cfg, gpu)}


def _put_max(store: Store, key: str, doc: dict[str, Any]) -> bool:
    """Write `doc` unless the record already holds as much time. True when it wrote."""
    for _ in range(TRIES):
        blob = store.get(key)
        if blob is not None:
            try:
                old = json.loads(blob.data)
            except ValueError:
                old = {}
            if float(old.get("seconds") or 0.0) >= doc["seconds"]:
                return False
        data = json.dumps(doc, sort_keys=True).encode()
        try:
            if blob is None:
                store.put(key, data, if_none_match=True)
            else:
                store.put(key, data, if_match=blob.etag)
            return True
        except ConflictError:
            continue  # another collector wrote it between: read again
    return False


def collect(cfg: Config, store: Store, entries: Mapping[str, Any], model_of: Any = None) -> list[str]:
    """Cost records from the Dict's `uptime:` entries (`entries`: dict_items("uptime:")). Returns the
    keys of the records it wrote or raised; an entry it cannot read is skipped."""
    wrote = []
    for dict_key, e in sorted(entries.items()):
        if not isinstance(e, dict):
            continue
        try:
            start, end = float(e["started"]), float(e["last_beat"])
        except (KeyError, TypeError, ValueError):
            continue
        releases = [str(r) for r in e.get("releases") or []]
        release = releases[0] if len(releases) == 1 else None
        model = e.get("model")
        if release and model_of is not None:
            model = model_of(release) or model
        for month, seconds in _months(start, end):
            doc = {"at": now(), "kind": "serve", "model": model, "release": release} | {
                k: round(v, 9) for k, v in (dict.fromkeys(KEYS, 0.0) | spend(cfg, seconds, e.get("gpu"))).items()
            }
            doc |= {"seconds": round(seconds, 3), "app": e.get("app"), "gpu": e.get("gpu"), "releases": releases}
            key = _key(month, dict_key)
            if _put_max(store, key, doc):
                wrote.append(key)
    return wrote
