"""Where a run executes and what it costs: device, precision, peak memory, GPU type, dollars.

Precision is autocast: matmuls run in bf16/fp16 while the master weights (full fine-tune) and the
optimizer state stay fp32, the usual mixed-precision recipe. fp16 also needs a loss scaler; bf16
does not (same exponent range as fp32). On CPU, bf16 autocast runs (a test exercises it) but fp16
and QLoRA are refused: they exist for CUDA kernels.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

from mlops.errors import ConfigError

# The Modal GPU type named in a device name, most specific first (A100s differ by memory).
_DEVICE_NAMES = (
    ("A100", "80GB", "A100-80GB"),
    ("A100", "", "A100-40GB"),
    ("H200", "", "H200"),
    ("H100", "", "H100"),
    ("B200", "", "B200"),
    ("L40S", "", "L40S"),
    ("A10G", "", "A10G"),
    ("L4", "", "L4"),
    ("T4", "", "T4"),
)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str | None, dev: str, method: str) -> str:
    """The precision to train in; a clear ConfigError for what this device cannot do."""
    import torch

    if method == "qlora" and dev != "cuda":
        raise ConfigError(
            "method: qlora loads the base in 4 bits through bitsandbytes, which needs a CUDA GPU; "
            "this machine has none (use method: lora here, or backend: modal with a GPU)"
        )
    if requested is None:
        if dev != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and dev != "cuda":
        raise ConfigError(
            "train.precision: fp16 needs a CUDA GPU (its loss scaling is CUDA's); use bf16 or fp32 on CPU"
        )
    if requested == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this GPU has no bf16; use fp16 (or a newer GPU: A10G, L4, A100, H100)")
    return requested


def autocast(precision: str, dev: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=dev, dtype=dtype)


def reset_peak(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(dev: str) -> float:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set (all of it, not just torch)."""
    if dev == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def gpu_type(requested: str | None, dev: str) -> tuple[str | None, int]:
    """(Modal GPU type, count): what was asked for (`H100:2`), else read off the device."""
    if dev != "cuda":
        return None, 0
    import torch

    if requested:
        name, _, count = requested.partition(":")
        return name.upper(), int(count) if count.isdigit() else 1
    seen = torch.cuda.get_device_name(0).upper()
    for needle, extra, modal_name in _DEVICE_NAMES:
        if needle in seen and extra in seen:
            return modal_name, torch.cuda.device_count()
    return seen, torch.cuda.device_count()


def cost_usd(gpu: str | None, gpu_seconds: float, prices: dict[str, float]) -> float | None:
    """Dollars for the GPU time; 0 on CPU; None when the GPU type has no price in the table."""
    if gpu is None:
        return 0.0
    table = {k.upper(): v for k, v in prices.items()}
    if gpu.upper() not in table:
        return None
    return round(table[gpu.upper()] * gpu_seconds / 3600, 4)
