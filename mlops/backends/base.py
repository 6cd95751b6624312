"""The backend protocol. The base class does the cross-cutting work (timing, logging, records,
preflight); a backend implements the private hooks. `local.py` and `modal.py` stay short and parallel.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from mlops.config import Loaded
from mlops.registry.releases import Registry, State
from mlops.training.train import Progress, TrainJob, TrainResult

log = logging.getLogger("mlops.backend")


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, loaded: Loaded, registry: Registry) -> None:
        self.loaded = loaded
        self.cfg = loaded.cfg
        self.registry = registry

    # ------------------------------------------------------------------ public API

    def train(self, job: TrainJob, progress: Progress | None = None) -> TrainResult:
        t0 = time.perf_counter()
        log.info("train %s on %s: %d steps", job.model_name, self.name, job.steps)
        result = self._train(job, progress)
        log.info("trained %s in %.1fs (loss %.4f)", job.model_name, time.perf_counter() - t0, result.final_loss)
        return result

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve whatever the registry's state routes to; yield the endpoint's base URL."""
        t0 = time.perf_counter()
        with self._serve() as url:
            log.info("endpoint %s up in %.1fs", url, time.perf_counter() - t0)
            yield url

    def set_state(self, change: Callable[[State], State | None], reason: str, actor: str = "pipeline") -> State:
        """Move stages/routing in the registry (one compare-and-swap), then publish to the serving side."""
        state = self.registry.update_state(change, reason=reason, actor=actor)
        self._publish(state)
        return state

    def preflight(self, release_id: str) -> dict[str, Any]:
        """Refuse to route to a release whose artifact is missing, corrupt, or does not load."""
        manifest = self.registry.verify(release_id)
        self._preflight(release_id)
        return manifest

    def prepare(self, release_id: str) -> None:
        """Make a release servable before requests are pinned to it (eval): locally the server loads
        what it is asked for; on Modal this deploys the release's own vLLM app and waits for it."""
        self._prepare(release_id)

    def endpoint(self) -> str | None:
        return self._endpoint()

    # ------------------------------------------------------------------ hooks

    @abstractmethod
    def _train(self, job: TrainJob, progress: Progress | None) -> TrainResult: ...

    @abstractmethod
    def _serve(self) -> contextlib.AbstractContextManager[str]: ...

    def _publish(self, state: State) -> None:  # noqa: B027 - optional hook
        """Push a new state to where the serving side reads it (the local server reads the store)."""

    def _preflight(self, release_id: str) -> None:  # noqa: B027 - optional hook
        """Prove the release loads before any pointer moves."""

    def _prepare(self, release_id: str) -> None:  # noqa: B027 - optional hook
        """Nothing to do where the server loads releases on demand."""

    def _endpoint(self) -> str | None:
        return None
