"""Scheduled functions in the Modal twin (`schedule=modal.Period(...)`), run on its clock.

A deployed app with a scheduled function gets a scheduler process (its own process group, stopped
with the app by `app stop` / `stop-all`): as on Modal, the function first runs one period after
the deploy (a redeploy resets a Period), then every period, each invocation in a container process
of its own (the app's code snapshot, a container's bare environment) that runs the function's
plain body as `<name>_body(api, period_s=...)`. One invocation at a time (functions/controller.py
sets `max_containers=1`): one still running when the next is due delays it, never doubles it.

Tests shorten every period with a file `schedule` in the twin's directory (seconds, read each
time), as they age the Dict with `clock`. Each invocation is a line `schedule APP/FN` in calls.log.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_UNIT_S = {"years": 365 * 86400, "months": 30 * 86400, "weeks": 7 * 86400, "days": 86400}
_UNIT_S |= {"hours": 3600, "minutes": 60, "seconds": 1}
INVOKE_TIMEOUT_S = 900.0  # a stuck invocation is ended, as Modal's function timeout would


def period_seconds(text: str | None) -> float | None:
    """The period of `Period(hours=1, seconds=30.0)` (what the SDK keeps of a schedule) in
    seconds; None for no schedule. A Cron schedule is refused: the twin runs periods only."""
    if not text:
        return None
    m = re.fullmatch(r"Period\((.*)\)", text.strip())
    if m is None:
        raise ValueError(f"the Modal twin runs modal.Period schedules only, not {text}")
    total = 0.0
    for part in filter(None, (p.strip() for p in m.group(1).split(","))):
        unit, _, value = part.partition("=")
        total += float(value) * _UNIT_S[unit.strip()]
    return total


def period(api: Any, declared: float) -> float:
    """The period now: the twin's `schedule` file, if any, else what the decorator declared."""
    p = Path(api.root) / "schedule"
    return float(p.read_text().strip() or declared) if p.is_file() else declared


def serve_schedule(api: Any, name: str) -> int:
    """The scheduler of app `name` (until SIGTERM): every scheduled function on its period."""
    app = api._apps()[name]
    scheduled = {fn: float(spec["schedule"]) for fn, spec in app["functions"].items() if spec.get("schedule")}
    threads = [
        threading.Thread(target=_every, args=(api, name, fn, p), daemon=True, name=f"schedule-{fn}")
        for fn, p in scheduled.items()
    ]
    for t in threads:
        t.start()
    print(f"twin: {name} runs {', '.join(sorted(scheduled))} on a schedule", flush=True)
    for t in threads:
        t.join()
    return 0


def _every(api: Any, name: str, fn: str, declared: float) -> None:
    last = time.monotonic()  # the deploy: a Period's first run is one period later
    wake = threading.Event()  # never set: a wait that a changed `schedule` file shortens
    while True:
        while time.monotonic() < last + period(api, declared):
            wake.wait(min(0.2, max(last + period(api, declared) - time.monotonic(), 0.01)))
        last = time.monotonic()
        invoke(api, name, fn, period(api, declared))


def invoke(api: Any, name: str, fn: str, period_s: float) -> int:
    """One invocation in a container process of its own; its output goes to the app's log."""
    app = api._apps().get(name)
    if app is None:
        return 0
    with api._locked(), (api.root / "calls.log").open("a") as f:
        f.write(f"schedule {name}/{fn}\n")
    cmd = [sys.executable, "-m", "mlops.backends.modal_twin_run", "_tick", name, fn, str(period_s)]
    try:
        proc = subprocess.run(cmd, env=api._env(app, fn), stdin=subprocess.DEVNULL, timeout=INVOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"twin: {name}/{fn} timed out after {INVOKE_TIMEOUT_S:.0f}s", flush=True)
        return 124
    return proc.returncode


def tick(name: str, fn: str, period_s: float) -> int:
    """Inside the container: the function's plain body, with the twin as its `ModalAPI`."""
    import importlib
    import os
    import traceback

    from mlops.backends.modal_settings import TWIN_ENV, current_settings
    from mlops.backends.modal_twin import TwinAPI

    api = TwinAPI(Path(os.environ[TWIN_ENV]), current_settings())
    mod = importlib.import_module(api._apps()[name]["module"])
    try:
        getattr(mod, fn + "_body")(api, period_s=period_s)
    except Exception:  # as on Modal: the invocation fails, its traceback in the app's log
        traceback.print_exc()
        return 1
    return 0
