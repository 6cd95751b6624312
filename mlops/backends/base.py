"""The backend protocol, split by the roles a backend plays:

    Trainer  train a TrainJob somewhere, leave the model in `job.out_dir`
    Server   make a release servable, serve the routed state, say where the endpoint is
    Router   move stages/routing in the registry and publish them to where serving reads them;
             record the decisions in the release's history (the flows' one door to the registry)

The base classes do the cross-cutting work (timing, logging, preflight checks); an implementation
fills in the private hooks. `Backend` plays all three (local, modal); a training-only backend
(Ray, SkyPilot) implements `Trainer` alone and is paired with a server by its config.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from mlops.config import Loaded
from mlops.registry.releases import Registry, State

if TYPE_CHECKING:  # the training code is not needed to route or serve (`mlops rollback`)
    from mlops.training.train import Progress, TrainJob, TrainResult

log = logging.getLogger("mlops.backend")


def routing_view(st: State) -> tuple[Any, ...]:
    """What the serving side acts on. Bookkeeping (`candidate`, version, reason) is not in it, so a
    job that only records a candidate (a PR's eval) never publishes its registry's routing."""
    stages = tuple(st.stages.get(k) for k in ("production", "previous", "canary"))
    # a running experiment's id salts the users' arms (mlops/serving/routing.py): serving needs it
    experiment = (st.experiment.get("id"), st.experiment.get("share")) if st.experiment else None
    return stages, sorted(st.routing.items()), sorted(st.shadow.items()), experiment


class _Role:
    name: ClassVar[str]

    def __init__(self, loaded: Loaded, registry: Registry) -> None:
        self.loaded = loaded
        self.cfg = loaded.cfg
        self.registry = registry


class Trainer(_Role, ABC):
    def train(self, job: TrainJob, progress: Progress | None = None) -> TrainResult:
        t0 = time.perf_counter()
        log.info("train %s on %s: %d steps", job.model_name, self.name, job.steps)
        result = self._train(job, progress)
        log.info("trained %s in %.1fs (loss %.4f)", job.model_name, time.perf_counter() - t0, result.final_loss)
        return result

    @abstractmethod
    def _train(self, job: TrainJob, progress: Progress | None) -> TrainResult: ...


class Server(_Role, ABC):
    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve whatever the registry's state routes to; yield the endpoint's base URL."""
        t0 = time.perf_counter()
        with self._serve() as url:
            log.info("endpoint %s up in %.1fs", url, time.perf_counter() - t0)
            yield url

    def preflight(self, release_id: str) -> dict[str, Any]:
        """Refuse to route to a release whose artifact is missing, corrupt, or does not load."""
        manifest = self.registry.verify(release_id)
        if isinstance(manifest.get("adapter"), dict):  # a LoRA adapter: only on the base it was trained on
            from mlops.training.adapter import served_base

            served_base(release_id, manifest["adapter"], self.loaded.root)
        self._preflight(release_id)
        return manifest

    def prepare(self, release_id: str) -> None:
        """Make a release servable before requests are pinned to it (eval): locally the server loads
        what it is asked for; on Modal this deploys the release's own vLLM app and waits for it."""
        self._prepare(release_id)

    def endpoint(self) -> str | None:
        return self._endpoint()

    def remote_scoring(self) -> Any:
        """None (metrics score on this machine), or `f(suite, metrics, judge_clients) -> metrics`
        that swaps the heavy ones for ones scored elsewhere (Modal: functions/evaluate.py)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """This backend is done (its command or controller invocation ends): let go of what it
        holds for the process (on Modal its in-use marks; at a normal exit they go anyway)."""

    def require_controller(self) -> None:  # noqa: B027 - optional hook
        """Before a rollout is left to the rollout controller (`--no-wait`): make sure one will
        advance it, or fail in one line. Locally it is a child process of `mlops serve` (not checked:
        `mlops status` says when the record waits for one); on Modal a scheduled app."""

    def client_key(self) -> str | None:
        """The bearer key this machine presents to the endpoint (evals, canary, smoke)."""
        from mlops.util import api_key_from_env

        return api_key_from_env(self.cfg.deploy.server.api_key_env)

    @abstractmethod
    def _serve(self) -> contextlib.AbstractContextManager[str]: ...

    def _preflight(self, release_id: str) -> None:  # noqa: B027 - optional hook
        """Prove the release loads before any pointer moves."""

    def _prepare(self, release_id: str) -> None:  # noqa: B027 - optional hook
        """Nothing to do where the server loads releases on demand."""

    def _endpoint(self) -> str | None:
        return None


class Router(_Role):
    def set_state(self, change: Callable[[State], State | None], reason: str, actor: str = "pipeline") -> State:
        """Move stages/routing in the registry (one compare-and-swap), then publish to the serving
        side, only when what serving acts on changed (see `routing_view`)."""
        before, _ = self.registry.read_state()
        state = self.registry.update_state(change, reason=reason, actor=actor)
        if routing_view(state) != routing_view(before):
            self._publish(state)
        if state.stages != before.stages and self.cfg.tracking.mlflow is not None:
            # MLflow mirrors the stages as aliases; it never fails a move (tracking_mlflow's doc)
            from mlops.tracking_mlflow import sync_aliases

            sync_aliases(self.loaded, self.registry, dict(state.stages), self.registry.model or self.cfg.deploy.model)
        return state

    def record(self, release: str, event: str, by: str = "pipeline", **detail: Any) -> None:
        """Append a decision to a release's history, in the registry this router moves state in
        (on every backend the one production is read from). With `set_state`, the one door flows
        use to the registry: they never write history past it."""
        self.registry.append_event(release, event, by, **detail)

    def _publish(self, state: State) -> None:  # noqa: B027 - optional hook
        """Push a new state to where the serving side reads it (the local server reads the store)."""


class Backend(Trainer, Server, Router):
    """A backend that trains, serves and routes (what `mlops run` needs)."""
