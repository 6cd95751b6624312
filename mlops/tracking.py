"""Weights & Biases: offline by default (real run files under ./wandb), online with WANDB_API_KEY;
and MLflow beside it when `tracking.mlflow` is set (mlops/tracking_mlflow.py)."""

from __future__ import annotations

import logging
import os
from typing import Any

from mlops.config import Loaded

log = logging.getLogger("mlops.tracking")


class Tracker:
    """One W&B run per pipeline run; a no-op when tracking is disabled or wandb is missing."""

    def __init__(self, loaded: Loaded, job_type: str, config: dict[str, Any] | None = None) -> None:
        self.run: Any = None
        self.mlflow: Any = None
        if loaded.cfg.tracking.mlflow is not None:
            from mlops.tracking_mlflow import MlflowRun

            self.mlflow = MlflowRun(loaded, loaded.cfg.tracking.mlflow, job_type, config or {})
        self._wandb(loaded, job_type, config)

    def _wandb(self, loaded: Loaded, job_type: str, config: dict[str, Any] | None) -> None:
        wb = loaded.cfg.tracking.wandb
        if wb.mode == "disabled" or os.environ.get("MLOPS_WANDB") == "disabled":
            return
        mode = wb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("tracking.wandb.mode is online but WANDB_API_KEY is not set: logging offline")
            mode = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: tracking disabled (pip install 'mlops[cloud]')")
            return
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True)
        self.run = wandb.init(
            project=wb.project or loaded.cfg.project,
            entity=wb.entity,
            mode=mode,
            dir=str(loaded.root),
            job_type=job_type,
            config=config or {},
            settings=settings,
            reinit="finish_previous",
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else str(self.run.id)

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else str(self.run.dir)

    @property
    def mlflow_run_id(self) -> str | None:
        return None if self.mlflow is None else self.mlflow.run_id

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.mlflow is not None:
            self.mlflow.log(data, step)
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        if self.mlflow is not None:
            self.mlflow.tags({f"mlops.{k}": v for k, v in data.items()})
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def artifact(self, name: str, data: bytes) -> None:
        """A file of the run (the report): an MLflow artifact (W&B keeps the summary)."""
        if self.mlflow is not None:
            self.mlflow.artifact(name, data)

    def finish(self, exit_code: int = 0) -> None:
        if self.mlflow is not None:
            self.mlflow.finish(exit_code)
            self.mlflow = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
