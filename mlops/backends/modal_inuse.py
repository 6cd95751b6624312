"""Releases in use, as every process sees them: `ModalBackend.stop_unreferenced` keeps their apps.

A process that preflights a release (an eval, a deploy, a rollback) marks it in the Modal Dict
before anything it does can publish (a publish cleans up): `inuse:<release>@<holder>` ->
{"release", "owner", "expires_at"}. One key per process (and backend) and release: the Dict has no
compare-and-swap, and two processes using one release must not drop each other's mark.

While the process runs, a thread renews its marks every RENEW_S to MARK_TTL_S ahead, so an eval
or a `--wait` rollout of any length keeps its apps. `close()` (the backend's teardown: the
controller's invocation ends, or the process exits normally, through atexit) puts None in their
place. A process that dies without it (SIGKILL, a lost machine) stops renewing: its marks are dead
at most MARK_TTL_S later, and the next cleanup stops the app it alone kept, so a crash never keeps
a GPU warm for long. `expires_at` is the writer's clock: clocks a minute apart still agree well
within the TTL. Dead and released marks are left to the Dict's own expiry (7 idle days).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from mlops.backends.modal_api import ModalAPI
from mlops.backends.modal_settings import INUSE_KEY

log = logging.getLogger("mlops.modal")

MARK_TTL_S = 600.0  # how long a crashed process's marks keep its apps up, at most
RENEW_S = 60.0  # a tenth of the TTL: several renewals may fail (a Modal hiccup) before a mark dies


class Marks:
    """The releases one backend (in one process) uses, marked in its Dict."""

    def __init__(self, api: Callable[[], ModalAPI]) -> None:
        self._api = api
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._token = secrets.token_hex(4)
        self._held: set[str] = set()
        self._lock = threading.Lock()  # a renewal never puts back a mark close() just dropped

    def _key(self, release: str) -> str:
        return f"{INUSE_KEY}{release}@{self.owner}:{self._token}"

    def _put(self, release: str) -> None:
        value = {"release": release, "owner": self.owner, "expires_at": time.time() + MARK_TTL_S}
        self._api().dict_put(self._key(release), value)

    def hold(self, release: str) -> None:
        with self._lock:
            self._put(release)
            self._held.add(release)
        _renewer.add(self)

    def renew(self) -> None:
        with self._lock:
            for release in sorted(self._held):
                self._put(release)

    def close(self) -> None:
        """Let go of every mark (this backend is done with its releases)."""
        _renewer.discard(self)
        with self._lock:
            held, self._held = sorted(self._held), set()
            for release in held:
                try:
                    self._api().dict_put(self._key(release), None)
                except Exception as e:  # the mark dies at its expiry instead
                    log.warning("could not drop the in-use mark of %s: %s", release, getattr(e, "headline", e))


def live_releases(api: ModalAPI, now: float | None = None) -> set[str]:
    """The releases some live process marked in use (its own included)."""
    at = time.time() if now is None else now
    out = set()
    for value in api.dict_items(INUSE_KEY).values():
        if isinstance(value, dict) and float(value.get("expires_at") or 0) > at and value.get("release"):
            out.add(str(value["release"]))
    return out


class _Renewer:
    """One daemon thread per process renews every backend's marks; atexit drops them all."""

    def __init__(self) -> None:
        self._marks: set[Marks] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, marks: Marks) -> None:
        with self._lock:
            self._marks.add(marks)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="modal-inuse")
                self._thread.start()
                atexit.register(self.close_all)

    def discard(self, marks: Marks) -> None:
        with self._lock:
            self._marks.discard(marks)

    def _run(self) -> None:
        while True:
            time.sleep(RENEW_S)
            with self._lock:
                current = list(self._marks)
            for m in current:
                try:
                    m.renew()
                except Exception as e:  # keep renewing: the mark survives until its expiry
                    log.warning("could not renew in-use marks: %s", getattr(e, "headline", e))

    def close_all(self) -> None:
        with self._lock:
            current = list(self._marks)
        for m in current:
            m.close()


_renewer = _Renewer()
