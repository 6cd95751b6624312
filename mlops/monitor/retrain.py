"""A drift retrain that no newer run can drop: the request lives in the registry until a CT run did it.

GitHub keeps at most one running and one pending run per concurrency group, and a newer pending run
cancels the older pending one. The nightly's `workflow_dispatch` of ct.yml can therefore be cancelled
by the next push while it waits behind a training. So the nightly also writes the drift report here
(`put`), and every CT run, whatever triggered it, starts by reading it (`take`) and, once the run
retrained (exit 0 or 3), removes it (`done`) unless a newer request replaced it meanwhile.

    python -m mlops.monitor.retrain put  --storage URI drift.json
    python -m mlops.monitor.retrain take --storage URI OUT      # prints the request's etag, or nothing
    python -m mlops.monitor.retrain done --storage URI ETAG
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlops.errors import ConfigError, MlopsError
from mlops.registry.store import Store, open_store

KEY = "monitor/retrain-request.json"


def put(store: Store, report: bytes) -> str:
    """Record (or replace) the pending retrain request; the newest drift report is the one kept."""
    try:
        json.loads(report)
    except ValueError as e:
        raise ConfigError(f"the drift report is not JSON: {e}") from None
    return store.put(KEY, report)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlops.monitor.retrain", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["put", "take", "done"])
    p.add_argument("--storage", required=True)
    p.add_argument("arg", help="put: the drift report file; take: where to write it; done: the etag take printed")
    a = p.parse_args(argv)
    try:
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
