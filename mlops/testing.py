"""`mlops serve` as a user runs it, for tests and benchmarks (as `typer.testing` ships a runner).

The real CLI in its own process on a free 127.0.0.1 port; the context manager yields its URL once
it answers, and stops it with SIGTERM (as a supervisor does) on exit, so whatever it buffered
(traffic capture) is flushed. A server that does not stop is killed, and that is an error.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlops.util import free_port

STARTUP_S = 120.0  # a cold start on a loaded 2-core machine (torch import + model load) took ~20 s
STOP_S = 60.0  # draining requests and flushing capture at SIGTERM


class ServeFailed(RuntimeError):
    """`mlops serve` exited, or did not answer in time."""


@contextlib.contextmanager
def mlops_serve(
    root: Path, *args: str, loaded: bool = False, startup_s: float = STARTUP_S, log: Path | None = None
) -> Iterator[str]:
    """Run `mlops serve --port PORT ARGS...` in `root`; yield `http://127.0.0.1:PORT` once /health
    answers 200 (and, with `loaded`, reports a model loaded). `log`: its stderr goes there."""
    import httpx

    port = free_port()
    err = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port), *args],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
        env=os.environ | {"MLOPS_WANDB": "disabled"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise ServeFailed(f"mlops serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200 and (not loaded or r.json().get("loaded")):
                    break
            if time.monotonic() > deadline:
                raise ServeFailed(f"mlops serve did not come up in {startup_s:.0f} s")
            time.sleep(0.1)  # polling a process that is importing torch; bounded by `deadline`
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise ServeFailed(f"mlops serve did not stop within {STOP_S:.0f} s of SIGTERM") from None
        finally:
            if log is not None and not isinstance(err, int):
                err.close()
