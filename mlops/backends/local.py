"""The embedded default: train in this process on CPU, serve on 127.0.0.1, routing in the registry."""

from __future__ import annotations

import contextlib
from typing import ClassVar

from mlops.backends.base import Backend
from mlops.training.train import Progress, TrainJob, TrainResult


class LocalBackend(Backend):
    name: ClassVar[str] = "local"

    def _train(self, job: TrainJob, progress: Progress | None) -> TrainResult:
        from mlops.training.train import train_model

        return train_model(job, progress)

    def _serve(self) -> contextlib.AbstractContextManager[str]:
        from mlops.serving.runner import serve_in_thread

        return serve_in_thread(self.loaded, self.registry)

    def _preflight(self, release_id: str) -> None:
        from mlops.serving.engine import Engine
        from mlops.serving.runner import quiet_transformers

        quiet_transformers()
        Engine(self.registry.artifact_dir(release_id), max_batch_size=1, max_queue=1).close()
