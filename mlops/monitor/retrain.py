"""A drift retrain that no newer run can drop: the request lives in the registry until a CT run did it.

GitHub keeps at most one running and one pending run per concurrency group, and a newer pending run
cancels the older pending one. The nightly's `workflow_dispatch` of ct.yml can therefore be cancelled
by the next push while it waits behind a training. So the nightly also writes the drift report here
(`put`), and every CT run, whatever triggered it, starts by reading it (`take`) and, once the run
retrained (exit 0 or 3), removes it (`done`) unless a newer request replaced it meanwhile.

Several deployed models: the request names the models whose traffic drifted (`models`: name ->
{release, requests, drifted}), and CT retrains those only (`flags`: `--force-model NAME` each); a request
without `models` (one deployed model) retrains every model. A newer request for another model
does not drop an older one's: `put` and `merge` keep both.

    python -m mlops.monitor.retrain put   --storage URI drift.json
    python -m mlops.monitor.retrain take  --storage URI OUT      # prints the request's etag, or nothing
    python -m mlops.monitor.retrain done  --storage URI ETAG
    python -m mlops.monitor.retrain merge OTHER INTO              # INTO := both requests (INTO's the newer)
    python -m mlops.monitor.retrain flags [--config mlops.yaml] drift.json   # `mlops run`'s force flags
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mlops.errors import ConfigError, ConflictError, InfraError, MlopsError
from mlops.registry.store import Store, open_store

KEY = "monitor/retrain-request.json"
CHECK_KEYS = ("name", "value", "threshold", "drifted")


def cut(report: dict[str, Any]) -> dict[str, Any]:
    """`mlops monitor --json`'s report cut to what CT records (a workflow_dispatch input holds at
    most 65535 characters); with several models, which of them drifted (`models`)."""
    keep = {k: report.get(k) for k in ("release", "since", "until", "requests", "drifted", "verdict")}
    keep["checks"] = [{k: c.get(k) for k in CHECK_KEYS} for c in report.get("checks") or []]
    models = report.get("models")
    if isinstance(models, dict):
        keep["models"] = {
            name: {k: r.get(k) for k in ("release", "requests")} | {"drifted": list(r.get("drifted") or [])}
            for name, r in models.items()
            if isinstance(r, dict)
        }
    return keep


def drifted_models(report: dict[str, Any]) -> list[str] | None:
    """The models a request retrains; None: every deployed model (a one-model report names none)."""
    models = report.get("models")
    if not isinstance(models, dict):
        return None
    return [name for name, r in models.items() if isinstance(r, dict) and r.get("drifted")]


def merge(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """One request for both: the newer report, plus the older one's drifted models the newer does
    not name as drifted (their checks too). Either one for every model: every model."""
    old_names, new_names = drifted_models(older), drifted_models(newer)
    if old_names is None or new_names is None:
        return {k: v for k, v in newer.items() if k != "models"}
    kept = [n for n in old_names if n not in new_names]
    if not kept:
        return newer

    def mine(name: str) -> bool:
        return name.split(".", 1)[0] in kept

    out = dict(newer)
    out["models"] = dict(newer["models"]) | {n: older["models"][n] for n in kept}
    out["drifted"] = [*(newer.get("drifted") or []), *(d for d in older.get("drifted") or [] if mine(d))]
    out["checks"] = [  # a kept model's checks are the older night's (the newer saw it within)
        *(c for c in newer.get("checks") or [] if not mine(c["name"])),
        *(c for c in older.get("checks") or [] if mine(c["name"])),
    ]
    return out


def _parse(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ConfigError(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} is not a JSON object (an `mlops monitor --json` report)")
    return doc


def put(store: Store, report: bytes) -> str:
    """Record the pending retrain request: the newest drift report, merged with a pending one that
    names other models (compare-and-swap: a CT run's `done` meanwhile is not undone)."""
    doc = _parse(report, "the drift report")
    for _ in range(5):  # each retry follows another writer's change; five in a row is not a race
        blob = store.get(KEY)
        if blob is None:
            try:
                return store.put(KEY, report, if_none_match=True)
            except ConflictError:
                continue
        try:
            older = _parse(blob.data, f"the pending request {KEY}")
        except ConfigError:
            older = {"models": {}}  # unreadable: replaced by the newer report
        data = json.dumps(merge(older, doc), separators=(",", ":"), default=str).encode()
        try:
            return store.put(KEY, data, if_match=blob.etag)
        except ConflictError:
            continue
    raise InfraError(f"{KEY} kept changing while the retrain request was written; run again")


def take(store: Store, out: Path) -> str | None:
    """Write the pending request to `out` and return its etag; None (and no file) when there is none."""
    blob = store.get(KEY)
    if blob is None:
        return None
    out.write_bytes(blob.data)
    return blob.etag


def done(store: Store, etag: str) -> bool:
    """Remove the request this run took; a newer one (another etag) stays for the next run."""
    blob = store.get(KEY)
    if blob is None or blob.etag != etag:
        return False
    store.delete(KEY)
    return True


def flags(report: dict[str, Any], deployed: list[str]) -> tuple[list[str], list[str]]:
    """`mlops run`'s flags for this request, and the drifted models no longer deployed (dropped:
    a request naming only those forces nothing, rather than failing every CT run until replaced)."""
    names = drifted_models(report)
    if names is None:
        return ["--force"], []
    gone = [n for n in names if n not in deployed]
    return [f for n in names if n in deployed for f in ("--force-model", n)], gone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlops.monitor.retrain", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["put", "take", "done", "merge", "flags"])
    p.add_argument("--storage", help="the registry (put, take, done)")
    p.add_argument("--config", default="mlops.yaml", help="flags: the deployed models are this file's")
    p.add_argument("arg", help="put, flags: the drift report; take: where to write it; done: the etag take printed")
    p.add_argument("into", nargs="?", help="merge: the request that becomes both (created when absent)")
    a = p.parse_args(argv)
    if a.action in ("put", "take", "done") and not a.storage:
        p.error(f"{a.action} needs --storage")
    if (a.action == "merge") != (a.into is not None):
        p.error("merge takes OTHER and INTO; the other actions one argument")
    try:
        if a.action == "merge":
            into, other = Path(a.into), _parse(Path(a.arg).read_bytes(), a.arg)
            doc = merge(other, _parse(into.read_bytes(), a.into)) if into.is_file() else other
            into.write_text(json.dumps(doc, separators=(",", ":"), default=str) + "\n", encoding="utf-8")
        elif a.action == "flags":
            from mlops.config import load

            deployed = load(Path(a.config)).cfg.deploy.names
            out, gone = flags(_parse(Path(a.arg).read_bytes(), a.arg), deployed)
            if gone:
                print(f"not retrained, no longer deployed: {', '.join(gone)}", file=sys.stderr)
            print(" ".join(out))
        else:
            store = open_store(a.storage, base_dir=Path.cwd())
            if a.action == "put":
                print(put(store, Path(a.arg).read_bytes()))
            elif a.action == "take":
                print(take(store, Path(a.arg)) or "")
            else:
                print("removed" if done(store, a.arg) else "kept: a newer request replaced it")
    except (MlopsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
