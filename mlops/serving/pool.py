"""Which releases are loaded, and the registry state the server follows.

The server re-reads `state.json` when the file changes (one `stat` per request on a local store,
a short TTL on a remote one), so `mlops rollback` from another shell moves traffic without a
restart. A watcher thread loads every release the state references (production, candidate,
previous, canary, routing, shadow) *before* traffic reaches it, and keeps the previous
production loaded, so a rollback never waits for a model load. Engines that drop out of the
state are closed after their in-flight requests finish (drain).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from mlops.errors import InfraError, MlopsError
from mlops.registry.releases import STATE_KEY, Registry, State
from mlops.serving.engine import Engine

log = logging.getLogger("mlops.serve")


class ReleasePool:
    def __init__(
        self,
        registry: Registry,
        max_batch_size: int = 32,
        max_queue: int = 256,
        remote_ttl: float = 1.0,
        watch_interval: float = 0.02,
        threads: int | None = None,
    ) -> None:
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.threads = threads
        self.remote_ttl = remote_ttl
        self._engines: dict[str, Engine] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._state, _ = registry.read_state()
        self._state_sig: object = None
        self._checked_at = 0.0
        self._state_path: Path | None = registry.store.local_path(STATE_KEY)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(watch_interval,), daemon=True, name="state-watch")

    # ------------------------------------------------------------------ state

    def _signature(self) -> object:
        if self._state_path is None:
            return None
        try:
            st = os.stat(self._state_path)
        except FileNotFoundError:
            return "missing"
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def state(self) -> State:
        """The current state; cheap enough to call on every request."""
        if self._state_path is not None:
            sig = self._signature()
            if sig != self._state_sig:
                self._reload(sig)
        elif time.monotonic() - self._checked_at > self.remote_ttl:
            self._reload(None)
        return self._state

    def _reload(self, sig: object) -> None:
        with self._lock:
            try:
                state, _ = self.registry.read_state()
            except MlopsError as e:  # keep serving the last good state when the store hiccups
                log.warning("cannot read state: %s", e.headline)
                return
            self._state, self._state_sig, self._checked_at = state, sig, time.monotonic()

    # ------------------------------------------------------------------ engines

    def start(self) -> None:
        self._sync_engines(self.state())
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        version = -1
        while not self._stop.wait(interval):
            st = self.state()
            if st.version != version:
                version = st.version
                self._sync_engines(st)

    def _sync_engines(self, st: State) -> None:
        wanted = st.referenced()
        for rid in sorted(wanted):
            if rid not in self._engines and rid not in self._failed:
                try:
                    self.get(rid)
                except MlopsError as e:
                    log.error("cannot load %s: %s", rid, e.headline)
        with self._lock:
            gone = [rid for rid in self._engines if rid not in wanted]
            engines = [self._engines.pop(rid) for rid in gone]
        for e in engines:  # drain outside the lock: requests in flight finish on their release
            threading.Thread(target=e.close, daemon=True).start()

    def get(self, release_id: str) -> Engine:
        eng = self._engines.get(release_id)
        if eng is not None:
            return eng
        with self._lock:
            lock = self._load_locks.setdefault(release_id, threading.Lock())
        with lock:
            eng = self._engines.get(release_id)
            if eng is not None:
                return eng
            try:
                path = self.registry.artifact_dir(release_id)
                eng = Engine(path, max_batch_size=self.max_batch_size, max_queue=self.max_queue, threads=self.threads)
            except MlopsError as e:
                self._failed[release_id] = e.headline
                raise
            except Exception as e:
                self._failed[release_id] = str(e)
                raise InfraError(f"cannot load {release_id}: {e}") from e
            with self._lock:
                self._engines[release_id] = eng
            log.info("loaded %s", release_id)
            return eng

    def loaded(self) -> list[str]:
        return sorted(self._engines)

    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in list(self._engines.values()))

    def close(self) -> None:
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for e in engines:
            e.close()
