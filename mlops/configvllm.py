"""mlops.yaml `deploy.vllm`: how vLLM serves the deployed model (Modal's engine, and the local
`deploy.engine: vllm`). Checked at `mlops validate` against vLLM 0.32's option table
(mlops/vllm_options.py), without importing vLLM. mlops/serving/vllm_argv.py turns it into flags."""

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from mlops.configbase import Strict


def _choices(flag: str) -> list[str]:
    """vLLM's choices for a flag. The 340-flag table loads on first use, not at import: `mlops
    validate`'s start-up is measured (benchmarks/bench_startup.py) and most files set no deploy.vllm."""
    from mlops import vllm_options

    return list(vllm_options.choices(flag))


def _enum_of(flag: str, kind: type = str) -> Any:
    def extra(schema: dict[str, Any]) -> None:  # run by `mlops schema` only
        schema["enum"] = [*(sorted(map(kind, _choices(flag))) if kind is int else _choices(flag)), None]

    return extra


def gpu_count(gpu: str | None) -> int:
    """GPUs per container of a Modal GPU spec: 'H100:2' -> 2, 'L4' -> 1, none -> 0."""
    if not gpu:
        return 0
    name, sep, count = gpu.partition(":")
    if not sep:
        return 1
    if not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"expected a GPU like 'H100' or 'H100:2' (a type, then a count of at least 1), got {gpu!r}")
    return int(count)


class VllmCfg(Strict):
    """Each field left out keeps vLLM's own default (enforce_eager: mlops' default, on)."""

    max_model_len: int | None = Field(None, ge=1, description="Context length (prompt + completion), tokens.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of each GPU's memory vLLM may take (weights + KV cache)."
    )
    dtype: str | None = Field(
        None,
        description="Weights and activations dtype.",
        json_schema_extra=_enum_of("--dtype"),
    )
    quantization: str | None = Field(
        None,
        description="Quantization method of the weights (e.g. awq, gptq, fp8).",
        json_schema_extra=_enum_of("--quantization"),
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences in one batch, at most.")
    enable_prefix_caching: bool | None = Field(None, description="Reuse the KV cache of shared prompt prefixes.")
    enforce_eager: bool = Field(
        True,
        description="No CUDA graphs or torch.compile: cold starts tens of seconds shorter (scale to zero) "
        "for some throughput; false for a long-lived, busy server.",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="Adapter releases (lora.serve: adapter) in one batch on the shared base; default 4.",
    )
    max_lora_rank: int | None = Field(
        None,
        description="Largest adapter rank the base takes (vLLM's --max-lora-rank); default 64.",
        json_schema_extra=_enum_of("--max-lora-rank", int),
    )
    extra_args: list[str] = Field(
        [],
        description="More vLLM server flags, as argv (e.g. ['--max-num-batched-tokens', '8192']); "
        "checked against vLLM 0.32's options.",
    )

    @field_validator("dtype", "quantization")
    @classmethod
    def _a_choice(cls, v: str | None, info: ValidationInfo) -> str | None:
        valid = _choices(f"--{info.field_name}")
        if v is not None and v not in valid:
            from mlops.plugins import did_you_mean

            raise ValueError(f"unknown {info.field_name} {v!r} {did_you_mean(v, valid)}")
        return v

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank(cls, v: int | None) -> int | None:
        valid = _choices("--max-lora-rank")
        if v is not None and str(v) not in valid:
            raise ValueError(f"max_lora_rank {v} is not one vLLM takes (valid: {', '.join(sorted(valid, key=int))})")
        return v

    @field_validator("extra_args")
    @classmethod
    def _known_flags(cls, v: list[str]) -> list[str]:
        from mlops import vllm_options

        if v and (err := vllm_options.check_args(v)):
            raise ValueError(err)
        return v

    def set_fields(self, leave: tuple[str, ...] = ()) -> list[str]:
        """The fields mlops.yaml sets, less `leave`: what an engine that applies only `leave` ignores."""
        return sorted(f for f in self.model_fields_set if f not in leave)
