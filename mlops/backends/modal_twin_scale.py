"""The twin's container of one serve app (`modal_twin_run._run`), and Modal's scale to zero.

On Modal a web function with `min_containers=0` has no container until a request arrives; that
request waits while one boots (image, weights, the server's own start: minutes for vLLM), and the
container stops after `scaledown_window` seconds without a request. The twin models this where
the file `<twin>/cold_start` holds a number of seconds: each container start then takes that much
longer than the stand-in server's own start (a GPU boot and weight load, compressed), the app is
cold from its deploy, and it is stopped after `scaledown_window` idle seconds of the twin's clock
(`<twin>/clock`, so a test ages it instead of waiting). Without the file, or with
`min_containers > 0`, the app keeps one container from its deploy on (what most tests want).

`<twin>/apps/<app>/tasks` holds how many containers run (0 or 1): the Tasks column of Modal's app list.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REAP_POLL_S = 0.2  # how often an idle container is checked against scaledown_window


class Container:
    """One container at most: started on demand (or at once), stopped when idle (scale to zero)."""

    def __init__(self, api: Any, name: str, start: Callable[[int], subprocess.Popen[str]]) -> None:
        from mlops.backends.modal_twin import free_port

        self._api, self._start, self._free_port = api, start, free_port
        cold = api.root / "cold_start"
        self.scale_to_zero = cold.is_file() and api.settings.min_containers == 0
        self.cold_start_s = float(cold.read_text()) if self.scale_to_zero else 0.0
        self._tasks = Path(api.root) / "apps" / name / "tasks"
        self._lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self._url = ""
        self._busy = 0
        self._last = api.now()
        self._write_tasks(0)

    def _write_tasks(self, n: int) -> None:
        tmp = self._tasks.with_suffix(".tmp")
        tmp.write_text(str(n))
        tmp.replace(self._tasks)

    def begin(self) -> str:
        """A request arrives: the URL of a running server, booting one first if there is none
        (the request waits, as on Modal; one that fails to start raises, with its log)."""
        with self._lock:  # concurrent requests wait for the same boot
            if self._child is None or self._child.poll() is not None:
                if self.cold_start_s:
                    print(f"twin: cold start ({self.cold_start_s:g} s + the server's own)", flush=True)
                    time.sleep(self.cold_start_s)  # the modelled boot: image pull, weight load
                port = self._free_port()
                self._child = self._start(port)
                self._url = f"http://127.0.0.1:{port}"
                self._write_tasks(1)
            self._busy += 1
            self._last = self._api.now()
            return self._url

    def end(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last = self._api.now()

    def reap_forever(self) -> None:
        """Stop the container once idle for `scaledown_window` (twin clock); run in a thread."""
        window = float(self._api.settings.scaledown_window)
        while True:
            time.sleep(REAP_POLL_S)  # a timer, as Modal's own idle check is: nothing to wait on
            with self._lock:
                child = self._child
                if child is None or self._busy or self._api.now() - self._last <= window:
                    continue
                print(f"twin: idle for {window:g} s: scaled to zero", flush=True)
                self.kill()

    def kill(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait(timeout=30)
            self._child = None
            self._write_tasks(0)
