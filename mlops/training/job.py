"""What a training run is asked to do (TrainJob) and what it reports (TrainResult: the run record)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlops.config import Loaded


@dataclass
class TrainJob:
    model_name: str
    dataset_path: str
    out_dir: str
    base: str = "scratch"
    method: str = "full"
    prompt: str = "{input}"
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    warmup_steps: int = 50
    weight_decay: float = 0.0
    threads: int | None = None
    arch: dict[str, int] = field(default_factory=lambda: {"n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 64})
    lora: dict[str, Any] = field(
        default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}
    )
    input_field: str = "input"
    target_field: str = "expected"
    precision: str | None = None  # bf16 | fp16 | fp32; None: bf16 on a GPU, fp32 on CPU
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    max_seq_len: int | None = None
    eval_every: int | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_s: float | None = None
    keep_checkpoints: int = 2
    runs_dir: str | None = None  # where resumable checkpoints live; None: no checkpoints
    gpu: str | None = None  # the Modal GPU type asked for (`H100:2`): what the cost is computed from
    gpu_prices: dict[str, float] = field(default_factory=dict)
    save_adapter: str | None = None  # LoRA: also keep the unmerged peft adapter in this directory


def job_from_config(loaded: Loaded, name: str, out_dir: Path, gpu: str | None = None) -> TrainJob:
    """The TrainJob `models.<name>` declares. Checkpoints go under the registry's storage when that
    is a directory (else under the local cache); `gpu` is the Modal GPU type the run is billed for."""
    m = loaded.cfg.models[name]
    ds = loaded.cfg.datasets[m.dataset]
    t = m.train
    storage = loaded.cfg.storage
    runs = loaded.root / ".mlops" / "cache" if "://" in storage else (loaded.root / storage)
    every_steps, every_s = t.checkpoint_interval()
    return TrainJob(
        model_name=name,
        dataset_path=str(loaded.dataset_path(m.dataset)),
        out_dir=str(out_dir),
        base=m.base,
        method=m.method,
        prompt=m.prompt,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        warmup_steps=min(t.warmup_steps, t.steps),
        weight_decay=t.weight_decay,
        threads=t.threads,
        arch=m.arch.model_dump(),
        lora=m.lora.model_dump(),
        input_field=ds.input_field,
        target_field=ds.target_field,
        precision=t.precision,
        grad_accum=t.grad_accum,
        gradient_checkpointing=t.gradient_checkpointing,
        max_seq_len=t.max_seq_len,
        eval_every=t.eval_every,
        checkpoint_every_steps=every_steps,
        checkpoint_every_s=every_s,
        keep_checkpoints=t.keep_checkpoints,
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
