"""The embedded default: train in this process on CPU, serve on 127.0.0.1, routing in the registry."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar

from mlops.backends.base import Backend
from mlops.errors import InfraError

if TYPE_CHECKING:  # the training code is not needed to route or serve (`mlops rollback`)
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
        from mlops.training.adapter import check_adapter_files, is_adapter_dir

        path = self.registry.artifact_dir(release_id)
        if is_adapter_dir(path):  # its base was checked by fingerprint; the server loads it into that base
            # no engine and no torch here: an adapter's deploy command stays a fraction of a second
            try:
                check_adapter_files(path)
            except Exception as e:
                raise InfraError(f"cannot load adapter {release_id}: {type(e).__name__}: {e}") from e
            return
        from mlops.serving.engine import Engine
        from mlops.serving.runner import quiet_transformers

        quiet_transformers()
        Engine(path, max_batch_size=1, max_queue=1).close()
