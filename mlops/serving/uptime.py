"""How long each serving container has held its GPU, kept in the Modal Dict (the twin's file) so the
CLI can turn it into cost records (mlops/registry/serve_costs.py) for `budget.*.serve_gpu_hours`.

A container (a release app's, or an adapter base app's) writes `uptime:<app>:<container>` =
{"started", "last_beat", "gpu", "app", "releases", "model"} when its server listens, every `BEAT_S`
seconds while it serves, and once more when the server or the container stops. Each container has
its own key, so containers never overwrite each other, and a container killed without warning
loses at most one interval of its time. Modal bills a container from its boot, a little before the
server listens: that boot is not counted (it is the same few minutes for every start).
"""

from __future__ import annotations

import atexit
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from mlops.registry.serve_costs import UPTIME

BEAT_S = 30.0  # at most this much of a killed container's time goes unrecorded; one Dict write each

Put = Callable[[str, Any], None]


class Uptime:
    def __init__(
        self,
        put: Put,
        app: str,
        *,
        gpu: str | None,
        releases: list[str],
        model: str | None = None,
        container: str | None = None,
        beat_s: float = BEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._put, self._clock, self.beat_s = put, clock, beat_s
        self.key = f"{UPTIME}{app}:{container or secrets.token_hex(6)}"
        self.doc: dict[str, Any] = {"app": app, "gpu": gpu, "releases": list(releases), "model": model}
        self.started = self._clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self._done = False  # the last beat is written once: a later one would count idle time

    def beat(self, releases: list[str] | None = None) -> None:
        """Write this container's time so far (and, for a base app, the adapters it now serves)."""
        with self._lock:
            if releases is not None:
                self.doc["releases"] = sorted(set(self.doc["releases"]) | set(releases))
            doc = self.doc | {"started": self.started, "last_beat": self._clock()}
            try:
                self._put(self.key, doc)
            except Exception as e:  # the Dict unreachable a moment: the next beat carries the same total
                print(f"uptime: write failed: {type(e).__name__}: {e}", flush=True)

    def follow(self, proc: subprocess.Popen[str]) -> None:
        """Beat now, then every `beat_s` in a thread while `proc` (the server) runs, and once more
        when it ends or this process exits (Modal's SIGTERM on scale-down)."""
        self.beat()

        def loop() -> None:
            while proc.poll() is None and not self._stop.wait(self.beat_s):
                self.beat()
            self.stop()  # the server ended: its time ends here, not at this process's exit

        atexit.register(self.stop)
        self.thread = threading.Thread(target=loop, daemon=True, name="uptime")
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._stop.set()
        self.beat()
