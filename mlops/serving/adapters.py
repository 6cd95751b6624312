"""Adapter releases on a shared base: one loaded base per base fingerprint, an adapter per release.

A release whose manifest carries `adapter` (mlops/training/adapter.py) is not an engine of its own:
the pool asks `BaseHost` for its base (loaded once, on first need, and kept while any adapter
release on it is loaded), loads the adapter into it, and hands the server an `AdapterEngine`, a
view that tags each request with the release's adapter and submits it to the base's engine. So
requests for every adapter release on one base decode in one continuous batch, a canary between
two adapter releases is two views on one model, and rolling back switches adapters without
touching the base. Closing a view (its release left the routing for the retention period) drains
its requests, deletes its adapter from the base, and closes the base once no adapter is left.

An engine that can host adapters has `load_adapter(name, path)`, `unload_adapter(name)`,
`adapter_busy(name)` and `wait_adapter_idle(name, timeout)`, and runs a request with
`req.adapter` set on that adapter (the builtin engine: peft's mixed-batch LoRA).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlops.errors import InfraError
from mlops.serving.base import Engine
from mlops.serving.genrequest import EngineClosed, GenRequest

log = logging.getLogger("mlops.serve")


class AdapterEngine:
    """One adapter release, served by the engine of its base (see the module's docstring)."""

    def __init__(self, base: Any, name: str, model_dir: Path, on_close: Callable[[AdapterEngine], None]) -> None:
        self.base = base
        self.name = name
        self.model_dir = model_dir
        self._on_close = on_close
        self._closed = False
        self._released = False  # close() ran: the adapter is (being) unloaded and the base released
        self._lock = threading.Lock()  # a submit and closing never interleave: none slips past the drain

    # the shared batch's counters (every adapter on this base reports the same steps)
    @property
    def steps(self) -> int:
        return int(self.base.steps)

    @property
    def step_rows(self) -> int:
        return int(self.base.step_rows)

    @property
    def prefills(self) -> int:
        return int(self.base.prefills)

    @property
    def requests_done(self) -> int:
        return int(self.base.requests_done)

    @property
    def max_positions(self) -> int:
        return int(self.base.max_positions)

    def check(self, req: GenRequest) -> None:
        req.adapter = self.name
        self.base.check(req)

    def submit(self, req: GenRequest) -> GenRequest:
        with self._lock:
            if self._closed:
                raise EngineClosed(f"adapter release {self.name} is draining")
            req.adapter = self.name
            out: GenRequest = self.base.submit(req)
            return out

    def generate(self, req: GenRequest, timeout: float = 30.0) -> str:
        """The whole text of `req` with this adapter (for scripts and tests)."""
        self.submit(req)
        return "".join(self.base.stream(req, timeout))

    @property
    def queue_depth(self) -> int:
        return 0  # the queue is the base's, counted once (BaseHost.queue_depth)

    @property
    def busy(self) -> int:
        return int(self.base.adapter_busy(self.name))

    @property
    def closed(self) -> bool:
        return self._closed

    def stop_accepting(self) -> None:
        with self._lock:
            self._closed = True

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let this adapter's finish (bounded), delete it from the base."""
        with self._lock:
            first, self._closed, self._released = not self._released, True, True
        if not first:  # closed already (by the pool, then at shutdown): the base was released once
            return
        if not self.base.wait_adapter_idle(self.name, drain_timeout):
            log.warning("adapter %s: requests still running after %.0fs; unloading anyway", self.name, drain_timeout)
        self.base.unload_adapter(self.name)
        self._on_close(self)


class BaseHost:
    """The bases a pool has loaded for adapter releases, by base fingerprint, with how many adapter
    releases use each: the base is loaded once, and closed when its last adapter is unloaded."""

    def __init__(self, factory: Callable[[Path], Engine]) -> None:
        self._factory = factory
        self._bases: dict[str, Any] = {}
        self._users: dict[str, int] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.loads = 0  # bases loaded (a switch between adapters on one base never adds one)

    def open(self, name: str, adapter_dir: Path, base_dir: Path, fingerprint: str) -> AdapterEngine:
        """The view of adapter release `name` on the base at `base_dir` (loading either as needed)."""
        with self._lock:
            self._users[fingerprint] = self._users.get(fingerprint, 0) + 1
        try:
            with self._load_lock:  # one base load at a time: two adapters on a new base load it once
                base = self._bases.get(fingerprint)
                if base is None:
                    base = self._factory(base_dir)
                    if not hasattr(base, "load_adapter"):
                        base.close()
                        raise InfraError(f"this engine cannot serve adapter releases ({name})")
                    self._bases[fingerprint] = base
                    self.loads += 1
                    log.info("loaded base %s (%s…) for adapter releases", base_dir, fingerprint[:12])
            base.load_adapter(name, adapter_dir)
        except BaseException:
            self._release(fingerprint)
            raise
        return AdapterEngine(base, name, adapter_dir, lambda _v: self._release(fingerprint))

    def _release(self, fingerprint: str) -> None:
        with self._lock:
            self._users[fingerprint] -= 1
            if self._users[fingerprint] > 0:
                return
            del self._users[fingerprint]
            base = self._bases.pop(fingerprint, None)
        if base is not None:
            log.info("closing base %s… (no adapter release on it is loaded)", fingerprint[:12])
            base.close()

    def queue_depth(self) -> int:
        return sum(int(b.queue_depth) for b in list(self._bases.values()))

    def bases(self) -> dict[str, Any]:
        return dict(self._bases)

    def close(self) -> None:
        with self._lock:
            bases = list(self._bases.values())
            self._bases.clear()
            self._users.clear()
        for b in bases:
            b.close()
