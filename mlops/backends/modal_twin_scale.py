"""The twin's containers of one web app (`modal_twin_run._run`), and Modal's scaling.

On Modal a web function with `min_containers=0` has no container until a request arrives; that
request waits while one boots (image, weights, the server's own start: minutes for vLLM), and the
container stops after `scaledown_window` seconds without a request. The twin models this where
the file `<twin>/cold_start` holds a number of seconds: the app is cold from its deploy, and each
container is stopped after `scaledown_window` idle seconds of the twin's clock (`<twin>/clock`,
so a test ages it instead of waiting); a GPU container's start takes that many seconds longer than
the stand-in server's own (a GPU boot and weight load, compressed). Without the file, or with
`min_containers > 0`, the app keeps a container from its deploy on (what most tests want).

Modal also runs more than one container of an app under load. The twin runs up to
`<twin>/containers.json`'s number for the app (`{"<app>": 2}`, default 1; at most the function's
`max_containers`) and spreads requests over them in turn: a test sees what two containers do.
A container is stopped as Modal stops one: SIGTERM, a grace period, then SIGKILL.

`<twin>/apps/<app>/tasks` holds how many containers run: the Tasks column of Modal's app list;
`<twin>/apps/<app>/starts` counts container starts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REAP_POLL_S = 0.2  # how often an idle container is checked against scaledown_window
STOP_GRACE_S = 30.0  # Modal's grace period between SIGTERM and SIGKILL


@dataclass
class _Box:
    child: subprocess.Popen[str]
    url: str
    busy: int = 0
    last: float = 0.0


class Pool:
    """The containers of one app: started on demand (or one at once), stopped when idle."""

    def __init__(
        self,
        api: Any,
        name: str,
        start: Callable[[int], subprocess.Popen[str]],
        *,
        min_containers: int,
        max_containers: int,
        gpu_boot: bool = True,
    ) -> None:
        from mlops.backends.modal_twin import free_port

        self._api, self._start, self._free_port = api, start, free_port
        cold = api.root / "cold_start"
        self.scale_to_zero = cold.is_file() and min_containers == 0
        self.cold_start_s = float(cold.read_text() or 0) if self.scale_to_zero and gpu_boot else 0.0
        wanted = (
            json.loads((api.root / "containers.json").read_text()).get(name, 1)
            if (api.root / "containers.json").is_file()
            else 1
        )
        self.size = max(1, min(int(wanted), max_containers))
        self._dir = Path(api.root) / "apps" / name
        self._lock = threading.Lock()
        self._boxes: list[_Box | None] = [None] * self.size
        self._turn = 0
        self._write("tasks", 0)

    def _write(self, name: str, n: int) -> None:
        p = self._dir / name
        tmp = p.with_suffix(".tmp")
        tmp.write_text(str(n))
        tmp.replace(p)

    def _running(self) -> int:
        return sum(1 for b in self._boxes if b is not None)

    def begin(self) -> str:
        """A request arrives: the URL of a running container (the next in turn), booting it first
        if it is not running (the request waits, as on Modal; one that fails to start raises)."""
        with self._lock:  # concurrent requests wait for the same boot
            i = self._turn % self.size
            self._turn += 1
            box = self._boxes[i]
            if box is None or box.child.poll() is not None:
                if self.cold_start_s:
                    print(f"twin: cold start ({self.cold_start_s:g} s + the server's own)", flush=True)
                    time.sleep(self.cold_start_s)  # the modelled boot: image pull, weight load
                port = self._free_port()
                box = self._boxes[i] = _Box(self._start(port), f"http://127.0.0.1:{port}")
                starts = self._dir / "starts"
                self._write("starts", int(starts.read_text()) + 1 if starts.is_file() else 1)
                self._write("tasks", self._running())
            box.busy += 1
            box.last = self._api.now()
            return box.url

    def end(self, url: str) -> None:
        with self._lock:
            for box in self._boxes:
                if box is not None and box.url == url:
                    box.busy -= 1
                    box.last = self._api.now()

    def reap_forever(self) -> None:
        """Stop each container once idle for `scaledown_window` (twin clock); run in a thread."""
        window = float(self._api.settings.scaledown_window)
        while True:
            time.sleep(REAP_POLL_S)  # a timer, as Modal's own idle check is: nothing to wait on
            with self._lock:
                now = self._api.now()
                for i, box in enumerate(self._boxes):
                    if box is not None and not box.busy and now - box.last > window:
                        print(f"twin: container {i} idle for {window:g} s: scaled down", flush=True)
                        self._stop(i)

    def _stop(self, i: int) -> None:
        box = self._boxes[i]
        if box is None:
            return
        box.child.terminate()
        try:
            box.child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            box.child.kill()
            box.child.wait(timeout=30)
        self._boxes[i] = None
        self._write("tasks", self._running())

    def kill(self) -> None:
        for i in range(self.size):
            self._stop(i)
