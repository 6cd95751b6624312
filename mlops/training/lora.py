"""Minimal LoRA for GPT-2-style models (Conv1D and Linear), merged back before saving.

Merging keeps the artifact a plain Hugging Face model, so vLLM serves a LoRA fine-tune exactly as
it serves a full one. peft would add a dependency for what is ~40 lines here.
"""

from __future__ import annotations

import math
from typing import Any


def apply_lora(model: Any, r: int, alpha: int, dropout: float, targets: list[str]) -> list[Any]:
    """Freeze `model`, wrap every module whose name ends with a target; return the trainable params."""
    import torch
    from torch import nn

    class LoraWrap(nn.Module):
        def __init__(self, base: Any) -> None:
            super().__init__()
            self.base: Any = base
            w = base.weight
            # transformers' Conv1D stores (in, out); nn.Linear stores (out, in)
            self.conv1d = type(base).__name__ == "Conv1D"
            fan_in, fan_out = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
            self.lora_a = nn.Parameter(torch.empty(r, fan_in))
            self.lora_b = nn.Parameter(torch.zeros(fan_out, r))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.scale = alpha / r
            self.drop = nn.Dropout(dropout)

        def forward(self, x: Any) -> Any:
            return self.base(x) + (self.drop(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

        def merged(self) -> Any:
            with torch.no_grad():
                delta = (self.lora_b @ self.lora_a) * self.scale  # (out, in)
                self.base.weight += delta.T if self.conv1d else delta
            return self.base

    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if any(full.endswith(t) for t in targets) and hasattr(child, "weight"):
                w = LoraWrap(child)
                setattr(module, child_name, w)
                wrapped.append(w)
    if not wrapped:
        from mlops.errors import ConfigError

        raise ConfigError(f"lora.target_modules {targets} matched no module of the base model")
    return [p for w in wrapped for p in (w.lora_a, w.lora_b)]


def merge_lora(model: Any) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "merged") and hasattr(child, "lora_a"):
                setattr(module, child_name, child.merged())
        del name
