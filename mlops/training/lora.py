"""LoRA and QLoRA through `peft`, merged into the base before the artifact is written.

Merging keeps the artifact a stock Hugging Face model (config + safetensors + tokenizer), so vLLM
and the builtin engine serve a LoRA fine-tune exactly as a full one. `target_modules` is checked
against the base model's own module names first: a typo gets the list of valid names instead of
peft's error deep in a stack. QLoRA loads the base in 4 bits through bitsandbytes, which needs CUDA.
"""

from __future__ import annotations

import difflib
from typing import Any

from mlops.errors import ConfigError

# Layer types peft's LoRA can wrap (transformers' Conv1D is GPT-2's linear layer).
ADAPTABLE = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Linear4bit", "Linear8bitLt")


def adaptable_names(model: Any) -> list[str]:
    """The short names (last path component) of the modules LoRA can adapt in `model`."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and type(m).__name__ in ADAPTABLE})


def check_targets(model: Any, targets: list[str]) -> None:
    """Every target must name an adaptable module of the base model (by full name or suffix)."""
    if targets == ["all-linear"]:
        return
    names = [n for n, m in model.named_modules() if n and type(m).__name__ in ADAPTABLE]
    valid = adaptable_names(model)
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            close = difflib.get_close_matches(t, valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"lora.target_modules: {t!r} is not a module of the base model "
                f"({hint}valid: {', '.join(valid)}, or all-linear)"
            )


def apply_lora(model: Any, r: int, alpha: int, dropout: float, targets: list[str]) -> Any:
    """Wrap `model` in a peft LoRA model; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, targets)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores (in, out); said here so peft need not warn
    )
    return get_peft_model(model, cfg)


def merge(peft_model: Any) -> Any:
    """The base model with the adapters folded into its weights (a plain transformers model)."""
    return peft_model.merge_and_unload()


def merge_into_full_precision(peft_model: Any, base: str, dtype: Any) -> Any:
    """QLoRA: a 4-bit base cannot hold merged weights; load it again unquantized and merge there."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapters = get_peft_model_state_dict(peft_model)
    lcfg = peft_model.peft_config["default"]
    full = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    from peft import get_peft_model

    again = get_peft_model(full, lcfg)
    set_peft_model_state_dict(again, adapters)
    return again.merge_and_unload()


def load_4bit(base: str, compute_dtype: Any) -> Any:
    """The base in NF4 through bitsandbytes (CUDA only; the caller refused CPU already)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("method: qlora needs bitsandbytes on the GPU machine: pip install bitsandbytes") from e
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
