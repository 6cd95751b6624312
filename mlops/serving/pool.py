"""Which releases are loaded, and the registry state the server follows.

The server follows `state.json` without a restart: on a local store one `stat` per request notices
a new version at once (a rollback from another shell moves the very next request); a remote store
is re-read by the watcher thread every `remote_ttl` seconds, never on the request path.

A new state is *served* only once every release it routes to is loaded: the watcher thread loads
every release the state references (production, candidate, previous, canary, routing, shadow)
before traffic reaches it, so a request never waits for a model load. A release that drops out of
the state stays loaded for `retain` seconds (the rollout's bake period) so that rolling back to it
is instant, then its engine drains (requests in flight finish on it) and closes.

A failed read of the state (an unreadable or partial object, a store that times out) is logged
and retried with backoff (up to BACKOFF_MAX_S apart); the pool keeps serving its last good state,
and `freshness()` (on `/health`) says how old that is and why: the watcher never dies of a read.

After each load the pool calls `gc.freeze()`: a model and torch bring half a million long-lived
objects, and a full collection that walks them all stops every thread for ~250 ms (measured), which
was most of the p99 latency under load. Frozen objects are skipped by collections; unloading an
engine unfreezes, collects once, and freezes again.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlops import plugins
from mlops.configvllm import VllmCfg
from mlops.errors import InfraError, MlopsError
from mlops.registry.releases import STATE_KEY, Registry, State
from mlops.serving.adapters import BaseHost
from mlops.serving.base import Engine, EngineFactory

log = logging.getLogger("mlops.serve")

DEFAULT_RETAIN_S = 600.0  # keep a release that left the routing loaded this long (instant rollback)
LOAD_RETRY_S = 30.0  # a release that failed to load is tried again after this long
STALE_AFTER_S = 10.0  # /health says "stale" when the state was last read successfully longer ago
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0  # between failed reads of the state: doubling, capped


def _drain(eng: Engine) -> None:
    """Let an unloaded engine finish what it holds, then give its memory back (see `gc.freeze`)."""
    eng.close()
    del eng
    gc.unfreeze()
    gc.collect()  # one pause per unload, rather than the model's objects never being freed
    gc.freeze()


def must_load(st: State) -> set[str]:
    """The releases a state sends requests to: routing weights (or production), and the shadow."""
    prod = st.stages.get("production")
    out = set(st.routing) or ({prod} if prod else set())
    if st.shadow.get("release"):
        out.add(str(st.shadow["release"]))
    return out


class ReleasePool:
    def __init__(
        self,
        registry: Registry,
        max_batch_size: int = 32,
        max_queue: int = 256,
        remote_ttl: float = 1.0,
        watch_interval: float = 0.02,
        threads: int | None = None,
        retain: float = DEFAULT_RETAIN_S,
        engine: str = "builtin",  # deploy.engine: a name in mlops.plugins.ENGINES
        vllm: VllmCfg | None = None,  # deploy.vllm: each engine takes what applies to it
        root: Path | None = None,  # mlops.yaml's folder: where an adapter release's `base` is found
    ) -> None:
        self.registry = registry
        self.root = root
        self.engine_name = engine
        self.vllm = vllm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.threads = threads
        self.remote_ttl = remote_ttl
        self.watch_interval = watch_interval
        self.retain = retain
        self._engines: dict[str, Engine] = {}
        self._dropped_at: dict[str, float] = {}  # loaded releases the state no longer references
        self._failed: dict[str, tuple[str, float]] = {}  # release -> (why, when)
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.loads: Counter[str] = Counter()  # "preload" | "request": where models were loaded
        self._latest, _ = registry.read_state()  # newest state read from the store
        self._serving = self._latest  # newest state whose releases are all loaded (or failed)
        self._state_sig: object = None
        self._read_at = time.monotonic()
        self._checked_at = self._read_at  # last time the store's state was read or seen unchanged
        self.stale_after = max(STALE_AFTER_S, 5 * remote_ttl)
        self.read_error: str | None = None  # why the last read failed (None once a read succeeds)
        self.read_failures = 0  # consecutive failed reads
        self._retry_at = 0.0
        self._state_path: Path | None = registry.store.local_path(STATE_KEY)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="state-watch")
        # adapter releases: their bases, each loaded once (mlops/serving/adapters.py)
        self.bases = BaseHost(self._base_engine)

    # ------------------------------------------------------------------ state

    def _signature(self) -> object:
        assert self._state_path is not None
        try:
            st = os.stat(self._state_path)
        except FileNotFoundError:
            return "missing"
        except OSError as e:  # unreadable directory: `_reload` fails, logs and backs off
            return f"stat failed: {e.errno}"
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def state(self) -> State:
        """The state requests are routed by; cheap enough to call on every request."""
        if self._state_path is not None:
            if self._signature() != self._state_sig:
                self._reload()
            elif self.read_error is None:
                self._checked_at = time.monotonic()  # unchanged on disk: what we hold is current
        if self._latest is not self._serving:
            self._advance()
        return self._serving

    def latest(self) -> State:
        """The newest state read from the store (it may still be waiting for a model load)."""
        return self._latest

    def _reload(self) -> None:
        with self._lock:
            sig = self._signature() if self._state_path is not None else None
            if self._state_path is not None and sig == self._state_sig:
                return
            now = time.monotonic()
            if now < self._retry_at:  # backing off after a failed read
                return
            try:
                state, _ = self.registry.read_state()
            except Exception as e:  # partial object, bad JSON, store down: keep the last good state
                self._read_failed(e, now)
                return
            if self.read_error is not None:
                log.warning(
                    "state readable again (version %d) after %d failed reads", state.version, self.read_failures
                )
            self.read_error, self.read_failures = None, 0
            self._state_sig, self._read_at, self._checked_at = sig, now, now
            if state.version != self._latest.version or state.to_json() != self._latest.to_json():
                self._latest = state

    def _read_failed(self, e: Exception, now: float) -> None:
        why = e.headline if isinstance(e, MlopsError) else f"{type(e).__name__}: {e}"
        self.read_failures += 1
        self._retry_at = now + min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self.read_failures - 1))
        if why != self.read_error:  # once per distinct error, not once per retry
            log.warning("cannot read the routing state (serving version %d): %s", self._latest.version, why[:300])
        self.read_error = why[:300]

    def freshness(self) -> dict[str, object]:
        """How current the served state is, for `/health`: seconds since the store's state was last
        read (or seen unchanged), whether that is older than `stale_after`, and the last read error."""
        age = time.monotonic() - self._checked_at
        return {"state_age_s": round(age, 3), "stale": age > self.stale_after, "state_error": self.read_error}

    def _advance(self) -> None:
        """Serve the newest state if everything it routes to is loaded; else let the watcher load."""
        latest = self._latest
        if all(r in self._engines or self._failed_recently(r) for r in must_load(latest)):
            self._serving = latest
        else:
            self._wake.set()

    def _failed_recently(self, rid: str) -> bool:
        f = self._failed.get(rid)
        return f is not None and time.monotonic() - f[1] < LOAD_RETRY_S

    # ------------------------------------------------------------------ engines

    def start(self) -> None:
        self._sync(self._latest)
        self._serving = self._latest
        self._watcher.start()

    def _watch(self) -> None:
        version = -1
        while not self._stop.is_set():
            self._wake.wait(self.watch_interval)
            self._wake.clear()
            try:
                if self._state_path is None and time.monotonic() - self._read_at > self.remote_ttl:
                    self._reload()
                elif self._state_path is not None:
                    self.state()  # notices a change even when no request comes
                st = self._latest
                if st.version != version or self._latest is not self._serving:
                    version = st.version
                    self._sync(st)
                    self._advance()
                self._expire()
            except Exception:  # whatever it was, the next round tries again: this thread must live
                log.exception("state watcher: unexpected error (retrying)")
                self._stop.wait(BACKOFF_MAX_S)

    def _sync(self, st: State) -> None:
        """Load what `st` references; start the retention clock of what it no longer references."""
        wanted = st.referenced()
        for rid in sorted(must_load(st)) + sorted(wanted - must_load(st)):  # routed ones first
            if rid not in self._engines and not self._failed_recently(rid):
                try:
                    self.get(rid, source="preload")
                except MlopsError as e:
                    log.error("cannot load %s: %s", rid, e.headline)
        now = time.monotonic()
        with self._lock:
            for rid in self._engines:
                if rid in wanted:
                    self._dropped_at.pop(rid, None)
                else:
                    self._dropped_at.setdefault(rid, now)

    def _expire(self) -> None:
        """Close engines whose release left the state more than `retain` seconds ago (drain first)."""
        now = time.monotonic()
        with self._lock:
            wanted = self._latest.referenced() | self._serving.referenced()
            gone = [r for r, t in self._dropped_at.items() if now - t >= self.retain and r not in wanted]
            engines = [self._engines.pop(r) for r in gone if r in self._engines]
            for r in gone:
                self._dropped_at.pop(r, None)
        for eng in engines:  # drain outside the lock: requests in flight finish on their release
            log.info("unloading %s (left the routing %.0fs ago)", eng.model_dir.name, self.retain)
            threading.Thread(target=_drain, args=(eng,), daemon=True, name=f"drain-{eng.model_dir.name}").start()

    def get(self, release_id: str, source: str = "request") -> Engine:
        """The engine of a release, loading it (verified against its sha256) if needed."""
        eng = self._engines.get(release_id)
        if eng is not None:
            return eng
        if self._failed_recently(release_id):
            raise InfraError(f"cannot load {release_id}: {self._failed[release_id][0]}")
        with self._lock:
            lock = self._load_locks.setdefault(release_id, threading.Lock())
        with lock:
            eng = self._engines.get(release_id)
            if eng is not None:
                return eng
            t0 = time.monotonic()
            try:
                path = self.registry.artifact_dir(release_id)
                adapter = (self.registry.manifest(release_id) or {}).get("adapter")
                if isinstance(adapter, dict):  # a LoRA adapter: into its base, loaded once for all of them
                    eng = self._adapter(release_id, path, adapter)
                else:
                    eng = self._factory()(path, **self._engine_options())
            except MlopsError as err:
                self._failed[release_id] = (err.headline, time.monotonic())
                raise
            except Exception as err:
                self._failed[release_id] = (str(err), time.monotonic())
                raise InfraError(f"cannot load {release_id}: {err}") from err
            with self._lock:
                self._engines[release_id] = eng
                self._failed.pop(release_id, None)
                self.loads[source] += 1
                if release_id not in self._latest.referenced():
                    self._dropped_at.setdefault(release_id, time.monotonic())
            gc.freeze()
            log.info("loaded %s (%s) in %.3f s", release_id, source, time.monotonic() - t0)
            return eng

    def _factory(self) -> EngineFactory:
        factory: EngineFactory = plugins.load("engine", self.engine_name)
        return factory

    def _engine_options(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "threads": self.threads,
            "vllm": self.vllm,
        }

    def _base_engine(self, path: Path) -> Engine:
        """An engine on the base of adapter releases (the builtin one: LoRA in its native forward
        pass, or peft on transformers' model where that does not run it; vLLM's `for_adapters`:
        --enable-lora)."""
        factory: Any = self._factory()
        make = getattr(factory, "for_adapters", factory)
        eng: Engine = make(path, **self._engine_options())
        return eng

    def _adapter(self, release_id: str, path: Path, adapter: dict[str, Any]) -> Engine:
        """The view of an adapter release on its base, once the base's fingerprint is the one the
        adapter was trained on (else a UsageError: the release is refused, never served)."""
        from mlops.training.adapter import served_base

        base_dir = served_base(release_id, adapter, self.root)
        return self.bases.open(release_id, path, base_dir, str(adapter["base_fingerprint"]))

    def unload(self, release_id: str) -> bool:
        """Drain and close a release's engine now (False: none was loaded); a later request loads it again."""
        with self._lock:
            eng = self._engines.pop(release_id, None)
            self._dropped_at.pop(release_id, None)
        if eng is None:
            return False
        _drain(eng)
        return True

    def engine(self, release_id: str) -> Engine | None:
        """The loaded engine of a release, or None (never loads)."""
        return self._engines.get(release_id)

    def loaded(self) -> list[str]:
        return sorted(self._engines)

    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in list(self._engines.values())) + self.bases.queue_depth()

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop following the state; drain every engine (requests in flight finish), then stop."""
        self._stop.set()
        self._wake.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for e in engines:
            e.stop_accepting()  # all at once, then each drains
        for e in engines:
            e.close(drain_timeout)
        self.bases.close()  # closed with their last adapter already; this is for a load cut short
