"""The model, tokenizer and export step of a run: lean GPT-2 from scratch, or a Hugging Face base
(full fine-tune, LoRA or QLoRA through peft). Whichever trains, `export` returns a stock
transformers model, which is what the artifact holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.errors import ConfigError

if TYPE_CHECKING:
    from mlops.training.job import TrainJob


@dataclass
class Setup:
    model: Any  # what trains: TinyGPT, a transformers model, or a peft model around one
    lean: bool  # TinyGPT: its forward takes ids only
    tok: Any  # a `tokenizers.Tokenizer`
    hf_tok: Any  # the base's transformers tokenizer (None from scratch)
    hf_export: Any  # from scratch: the GPT2LMHeadModel the lean weights are copied into
    pad_id: int
    eos_id: int
    max_len: int
    dtype: Any

    def export(self, job: TrainJob) -> Any:
        """A plain transformers model holding the trained weights (LoRA: merged into the base)."""
        from mlops.training import lora

        if self.lean:
            missing, unexpected = self.hf_export.load_state_dict(self.model.cpu().hf_state_dict(), strict=False)
            if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
                raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
            return self.hf_export
        if job.method in ("lora", "qlora") and job.save_adapter:
            self.model.save_pretrained(job.save_adapter)
        if job.method == "qlora":
            return lora.merge_into_full_precision(self.model, job.base, self.dtype)
        if job.method == "lora":
            return lora.merge(self.model)
        return self.model

    def save_tokenizer(self, out: Path) -> None:
        from mlops.training.tokenizer import save_tokenizer

        if self.hf_tok is not None:
            self.hf_tok.save_pretrained(str(out))
            if isinstance(self.hf_tok.chat_template, str):
                from mlops.training.offline_base import template_in_config

                template_in_config(out, self.hf_tok.chat_template)
        else:
            save_tokenizer(self.tok, out, self.max_len)


def build(job: TrainJob, pairs: list[tuple[str, str]], dev: str, prec: str) -> Setup:
    import torch

    if job.base == "scratch":
        return _scratch(job, pairs, dev)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlops.training import lora

    hf_tok = AutoTokenizer.from_pretrained(job.base)
    eos_id = hf_tok.eos_token_id
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_id
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    # a frozen LoRA base on a GPU is stored in the training precision (half the memory); a full
    # fine-tune keeps fp32 master weights and lets autocast do the half-precision matmuls
    dtype = half if job.method != "full" and dev == "cuda" else torch.float32
    if job.method == "qlora":
        model = lora.load_4bit(job.base, half)
    else:
        model = AutoModelForCausalLM.from_pretrained(job.base, dtype=dtype)
    max_len = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    if job.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if job.method in ("lora", "qlora"):
        lc = job.lora
        model = lora.apply_lora(model, lc["r"], lc["alpha"], lc["dropout"], list(lc["target_modules"]))
    if job.method != "qlora":  # bitsandbytes placed the 4-bit model already
        model.to(dev)
    return Setup(model, False, hf_tok.backend_tokenizer, hf_tok, None, pad_id, eos_id, max_len, dtype)


def _scratch(job: TrainJob, pairs: list[tuple[str, str]], dev: str) -> Setup:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlops.training.model import TinyGPT
    from mlops.training.tokenizer import EOS, PAD, build_char_tokenizer

    if job.method != "full":
        raise ConfigError(f"method: {job.method} needs a pretrained base, not 'scratch'")
    tok = build_char_tokenizer([p + c for p, c in pairs])
    pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
    arch: dict[str, Any] = dict(job.arch)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, **arch
    )
    hf_model = GPT2LMHeadModel(cfg)
    model = TinyGPT(cfg.vocab_size, **job.arch)
    model.gradient_checkpointing = job.gradient_checkpointing
    model.to(dev)
    return Setup(model, True, tok, None, hf_model, pad_id, eos_id, job.arch["n_positions"], torch.float32)
