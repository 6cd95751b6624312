"""Training on a Modal GPU: the same `train_model` the local backend runs, wrapped in a function.

    modal deploy functions/train.py        # once, and after changing images or resources

The flow (the simplest one that keeps the registry the single source of truth):
1. ModalBackend sends the TrainJob as a dict and the dataset bytes; `train` writes the model to
   the Volume at runs/<run_id>/ and returns the TrainResult plus each file's sha256.
2. The client downloads runs/<run_id>/ from the Volume, checks every sha256, and publishes the
   release to the registry (local directory or S3) from there, exactly as the local backend does.
No cloud credentials are needed in the container, and a failed download publishes nothing.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import modal
from images import VOLUME_MOUNT, extra_secrets, settings, train_image, volume

from mlops.backends.modal_settings import BASES, entrypoint_in_image, files_with_sha256

app = modal.App(settings.train_app)

PROGRESS_EVERY_S = 10.0  # a log line at most this often: Modal keeps the logs, CI shows them

# Resuming (issue 12): a preempted container is restarted by Modal on the same input, and a failed
# or timed-out attempt is retried with the same arguments (each attempt gets a fresh `timeout`).
# Checkpoints live on the Volume under checkpoints/<model>-<fingerprint>/ and are committed as they
# are written, so the next attempt continues from the last one instead of step 0.
TRAIN_RETRIES = modal.Retries(max_retries=3, backoff_coefficient=1.0, initial_delay=10.0)
CHECKPOINTS = "checkpoints"


def train_body(
    job_dict: dict[str, Any],
    dataset: bytes | None = None,
    run_id: str | None = None,
    root: str = VOLUME_MOUNT,
    on_checkpoint: Any = None,
) -> dict[str, Any]:
    """Train one model into `<root>/runs/<run_id>/`; return the TrainResult as a dict, plus
    `run_id`, `volume_dir` (relative to `root`) and `files` ({relative path: sha256}).

    `dataset` is the JSONL content when the caller's file is not on this machine; without it,
    `job_dict["dataset_path"]` is read as is. Plain Python: tests call it without Modal.
    """
    from mlops.training.train import TrainJob, train_model

    run_id = run_id or f"{job_dict.get('model_name', 'model')}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if "/" in run_id or run_id in ("", ".", ".."):
        raise ValueError(f"invalid run id {run_id!r}")
    out = Path(root) / "runs" / run_id
    with tempfile.TemporaryDirectory(prefix="mlops-train-") as tmp:
        data_path = job_dict["dataset_path"]
        if dataset is not None:
            data_path = str(Path(tmp) / "dataset.jsonl")
            Path(data_path).write_bytes(dataset)
        runs = str(Path(root) / CHECKPOINTS)  # the client's local path means nothing here
        here = {"dataset_path": data_path, "out_dir": str(out), "runs_dir": runs}
        entry = job_dict.get("entrypoint")
        if entry and not Path(entry.rpartition(":")[0]).is_file():  # in the image, not at the client's path
            local, _, func = entry.rpartition(":")
            here["entrypoint"] = f"{entrypoint_in_image(local)}:{func}"
        base = str(job_dict.get("base", "scratch"))
        if base.startswith(f"{BASES}/"):  # a local base the client copied to the Volume
            here["base"] = str(Path(root) / base)
        job = TrainJob(**(job_dict | here))
        last = [0.0]

        def progress(p: dict[str, float]) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or p["step"] >= job.steps:
                last[0] = now
                print(
                    f"step {int(p['step'])}/{job.steps} loss {p['loss']:.4f} {p['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )

        result = train_model(job, progress, on_checkpoint)
    return asdict(result) | {
        "run_id": run_id,
        "volume_dir": f"runs/{run_id}",
        "files": files_with_sha256(out),
    }


@app.function(
    image=train_image,
    gpu=settings.train_gpu,
    timeout=settings.train_timeout,
    retries=TRAIN_RETRIES,
    volumes={VOLUME_MOUNT: volume},
    secrets=extra_secrets(),
    env=settings.env(),
)
def train(job_dict: dict[str, Any], dataset: bytes | None = None, run_id: str | None = None) -> dict[str, Any]:
    out = train_body(job_dict, dataset, run_id, on_checkpoint=lambda _: volume.commit())
    volume.commit()  # make runs/<run_id>/ visible to the client's download before returning
    return out
