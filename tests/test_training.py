"""The training recipe: deterministic, a stock GPT-2 artifact, LoRA fine-tunes of a local base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

from mlops.registry.releases import sha256_file
from mlops.training.train import TrainJob, train_model

ARCH = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}


def job(out: Path, **kw: object) -> TrainJob:
    base = {
        "model_name": "t",
        "dataset_path": str(REPO / "data/train.jsonl"),
        "out_dir": str(out),
        "prompt": "{input}=",
        "steps": 8,
        "batch_size": 16,
        "warmup_steps": 2,
        "threads": 1,
        "arch": ARCH,
    }
    return TrainJob(**(base | kw))  # type: ignore[arg-type]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a = train_model(job(tmp_path / "a", seed=3))
    b = train_model(job(tmp_path / "b", seed=3))
    c = train_model(job(tmp_path / "c", seed=4))
    sha = [sha256_file(Path(r.out_dir) / "model.safetensors") for r in (a, b, c)]
    assert sha[0] == sha[1] != sha[2]
    assert a.final_loss == b.final_loss


def test_artifact_is_stock_hf_gpt2_with_matching_logits(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list[dict[str, float]] = []
    r = train_model(job(tmp_path / "m", steps=5), progress=seen.append)
    out = Path(r.out_dir)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")), "weights must be safetensors only"
    assert [int(d["step"]) for d in seen] == [1, 2, 3, 4, 5] and all(d["tokens_per_s"] > 0 for d in seen)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("abc=", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "abc="
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("abc=").ids == ids[0].tolist()

    # the lean training model and the exported GPT-2 compute the same function
    from mlops.training.model import TinyGPT

    tiny = TinyGPT(cfg["vocab_size"], **ARCH)
    state = {k: v for k, v in hf.state_dict().items()}
    with torch.no_grad():
        tiny.wte.weight.copy_(state["transformer.wte.weight"])
        tiny.wpe.weight.copy_(state["transformer.wpe.weight"])
        tiny.ln_f.load_state_dict({"weight": state["transformer.ln_f.weight"], "bias": state["transformer.ln_f.bias"]})
        b, p = tiny.h[0], "transformer.h.0."
        b.ln_1.load_state_dict({"weight": state[p + "ln_1.weight"], "bias": state[p + "ln_1.bias"]})
        b.ln_2.load_state_dict({"weight": state[p + "ln_2.weight"], "bias": state[p + "ln_2.bias"]})
        for ours, theirs in (
            ("c_attn", "attn.c_attn"),
            ("attn_proj", "attn.c_proj"),
            ("c_fc", "mlp.c_fc"),
            ("mlp_proj", "mlp.c_proj"),
        ):
            getattr(b, ours).weight.copy_(state[p + theirs + ".weight"].T)
            getattr(b, ours).bias.copy_(state[p + theirs + ".bias"])
        torch.testing.assert_close(tiny(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)


def test_lora_fine_tune_of_a_local_base_trains_only_adapters_and_merges(tmp_path: Path) -> None:
    base = train_model(job(tmp_path / "base", steps=3))
    before = sha256_file(Path(base.out_dir) / "model.safetensors")
    r = train_model(job(tmp_path / "lora", base=base.out_dir, method="lora", steps=3, lr=5e-2))
    assert r.parameters == train_model(job(tmp_path / "base2", steps=1)).parameters  # merged: same shape as the base
    assert sha256_file(Path(r.out_dir) / "model.safetensors") != before
    assert sha256_file(Path(base.out_dir) / "model.safetensors") == before  # the base is not modified


def test_lora_needs_a_pretrained_base(tmp_path: Path) -> None:
    from mlops.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a pretrained base"):
        train_model(job(tmp_path / "x", method="lora"))
