"""mlops.yaml's `models.<name>.train:` and `prices:` (issue 12): precision, accumulation, checkpoints."""

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator

from mlops.configbase import Strict, _duration

_DURATION_TEXT = r"^\s*\d+(\.\d+)?\s*(s|m|h)\s*$"


def _steps_or_duration(v: Any) -> Any:
    """A number of steps (int >= 1) or a duration string like 10m; anything else is one clear error."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    if isinstance(v, str) and re.fullmatch(_DURATION_TEXT, v):
        return v.strip()
    raise ValueError("expected a number of steps (e.g. 200) or a duration (e.g. 10m, 30s, 1h)")


StepsOrDuration = Annotated[
    int | str,
    BeforeValidator(_steps_or_duration),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _DURATION_TEXT}]}),
]


class TrainCfg(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(
        64, ge=1, description="Sequences per micro-batch (one optimizer step sees batch_size * grad_accum)."
    )
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads for local training (default: all cores).")
    precision: Literal["bf16", "fp16", "fp32"] | None = Field(
        None,
        description="Mixed precision (autocast; master weights stay fp32 for a full fine-tune). "
        "Default: bf16 on a GPU (fp16 where the GPU has no bf16), fp32 on CPU. fp16 needs CUDA.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% more compute."
    )
    max_seq_len: int | None = Field(
        None,
        ge=8,
        description="Truncate examples to this many tokens (the prompt's start is cut first). "
        "Default: the model's context length, and a longer example is an error.",
    )
    truncation: Literal["truncate", "drop"] = Field(
        "truncate",
        description="An example over max_seq_len: cut (chat: its end; pairs: the prompt's start) or left out. "
        "Either way the run record counts them.",
    )
    packing: bool = Field(
        False,
        description="Chat: pack whole conversations into rows of max_seq_len tokens (TRL's best-fit decreasing; "
        "each keeps its own positions and attention). batch_size then counts packed rows.",
    )
    entrypoint: str | None = Field(
        None,
        description="Your own training code: `path/to/file.py:function` (relative to mlops.yaml), called as "
        "function(job, out_dir) -> the saved model directory. The plan's fingerprint covers the file.",
        pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Every N steps, the loss on a fixed sample of the training data (no gradient)."
    )
    checkpoint_every: StepsOrDuration | None = Field(
        "10m",
        description="Write a resumable checkpoint every N steps (a number) or every duration (10m, 30s, 1h); "
        "null: never. A run started again with the same data, config and code resumes from the last one.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of a run's newest checkpoints to keep.")

    def checkpoint_interval(self) -> tuple[int | None, float | None]:
        """(every N steps, every S seconds): one of them set, or neither."""
        if self.checkpoint_every is None:
            return None, None
        if isinstance(self.checkpoint_every, int):
            return self.checkpoint_every, None
        return None, float(_duration(self.checkpoint_every))


# Modal's list prices, USD per GPU-hour (modal.com/pricing, 2026); `prices.gpu_per_hour` overrides entries.
MODAL_GPU_PRICES: dict[str, float] = {
    "T4": 0.59,
    "L4": 0.80,
    "A10G": 1.10,
    "L40S": 1.95,
    "A100-40GB": 2.10,
    "A100-80GB": 2.50,
    "H100": 3.95,
    "H200": 4.54,
    "B200": 6.25,
}


class PricesCfg(Strict):
    gpu_per_hour: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(MODAL_GPU_PRICES),
        description="USD per GPU-hour by Modal GPU type; the run record's cost comes from here. "
        "Entries you give replace the defaults of the same name; the rest stay.",
    )

    judge_per_1m_tokens: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="USD per million tokens (prompt + completion) by judge name (a key of `judges`); "
        "a judge left out costs nothing in dollars (a self-hosted one costs its GPU time).",
    )

    @field_validator("gpu_per_hour", mode="after")
    @classmethod
    def _over_defaults(cls, v: dict[str, float]) -> dict[str, float]:
        return MODAL_GPU_PRICES | v
