"""What a training run is asked to do (TrainJob) and what it reports (TrainResult: the run record)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mlops.config import ArchCfg, LoraCfg
from mlops.configtrain import StepsOrDuration, TrainCfg
from mlops.datasources import localize
from mlops.errors import ConfigError

if TYPE_CHECKING:
    from mlops.config import Loaded


class TrainJob(TrainCfg):
    """Every `models.<name>.train` key (inherited from TrainCfg, so a new key needs no edit here),
    the model keys training reads, and what only the run knows (paths, GPU, prices).

    It crosses into Modal as `model_dump()` (plain JSON) and comes back with `TrainJob(**d)`; the
    run record keeps the same dump. `checkpoint_every` is resolved into the two fields below it."""

    checkpoint_every: StepsOrDuration | None = Field(None, exclude=True)
    # the model's keys
    model_name: str
    dataset_path: str
    out_dir: str
    base: str = "scratch"
    method: str = "full"
    prompt: str = "{input}"
    arch: dict[str, int] = Field(default_factory=lambda: ArchCfg().model_dump())
    lora: dict[str, Any] = Field(default_factory=lambda: LoraCfg().model_dump())
    dataset_format: str | None = None  # pairs | chat | completion; None: detected from the first row
    input_field: str = "input"
    target_field: str = "expected"
    # the run's
    checkpoint_every_steps: int | None = None
    checkpoint_every_s: float | None = None
    runs_dir: str | None = None  # where resumable checkpoints live; None: no checkpoints
    gpu: str | None = None  # the Modal GPU type asked for (`H100:2`): what the cost is computed from
    gpu_prices: dict[str, float] = {}
    save_adapter: str | None = None  # LoRA: also keep the unmerged peft adapter in this directory

    @property
    def serves_adapter(self) -> bool:
        """The artifact is the peft adapter (lora.serve: adapter), not a merged model."""
        return self.method in ("lora", "qlora") and self.lora.get("serve") == "adapter"


def split_entrypoint(entrypoint: str) -> tuple[Path, str]:
    path, _, func = entrypoint.rpartition(":")
    if not path or not func:
        raise ConfigError(f"train.entrypoint {entrypoint!r}: expected path/to/file.py:function")
    return Path(path), func


def resolve_entrypoint(root: Path, entrypoint: str) -> str:
    """`file.py:function` with the file made absolute against the project root; the file must exist."""
    path, func = split_entrypoint(entrypoint)
    full = (root / path).resolve()
    if not full.is_file():
        raise ConfigError(f"train.entrypoint: {full} does not exist")
    return f"{full}:{func}"


def job_from_config(loaded: Loaded, name: str, out_dir: Path, gpu: str | None = None) -> TrainJob:
    """The TrainJob `models.<name>` declares. Checkpoints go under the registry's storage when that
    is a directory (else under the local cache); `gpu` is the Modal GPU type the run is billed for."""
    m = loaded.cfg.models[name]
    ds = loaded.cfg.datasets[m.dataset]
    t = m.train
    storage = loaded.cfg.storage
    runs = loaded.root / ".mlops" / "cache" if "://" in storage else (loaded.root / storage)
    every_steps, every_s = t.checkpoint_interval()
    # a local base directory and your own training file are named relative to mlops.yaml
    base = str((loaded.root / m.base).resolve()) if m.base != "scratch" and (loaded.root / m.base).is_dir() else m.base
    entry = resolve_entrypoint(loaded.root, t.entrypoint) if t.entrypoint else None
    return TrainJob(
        **(
            t.model_dump()
            | {"warmup_steps": min(t.warmup_steps, t.steps), "checkpoint_every": None, "entrypoint": entry}
        ),
        **m.model_dump(include={"method", "prompt", "arch", "lora"}),
        base=base,
        model_name=name,
        dataset_path=localize(loaded, m.dataset),
        out_dir=str(out_dir),
        dataset_format=ds.format,
        input_field=ds.input_field,
        target_field=ds.target_field,
        checkpoint_every_steps=every_steps,
        checkpoint_every_s=every_s,
        runs_dir=str(runs.resolve() / "checkpoints"),
        gpu=gpu,
        gpu_prices=dict(loaded.cfg.prices.gpu_per_hour),
    )


# Fields that do not change the trained weights, so they stay out of the resume fingerprint.
NOT_WEIGHTS = {
    "model_name",
    "dataset_path",
    "out_dir",
    "eval_every",
    "checkpoint_every_steps",
    "checkpoint_every_s",
    "keep_checkpoints",
    "runs_dir",
    "gpu",
    "gpu_prices",
    "save_adapter",
}


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    final_loss: float
    seconds: float
    tokens_per_s: float
    parameters: int
    device: str
    precision: str = "fp32"
    tokens: int = 0
    gpu_type: str | None = None
    gpu_count: int = 0
    gpu_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    cost_usd: float | None = 0.0
    resumed_from_step: int = 0
    checkpoints_written: int = 0
    eval_loss: float | None = None
    fingerprint: str | None = None
    data: dict[str, Any] | None = None  # format, conversations, truncated, dropped, packed, sequences
    base_sha256: str | None = None  # a local base directory's files, hashed (lineage)
    # lora.serve: adapter: {"base_fingerprint": mlops.training.adapter.base_fingerprint(base)}
    adapter: dict[str, str] | None = None
