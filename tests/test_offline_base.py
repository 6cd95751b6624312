"""The offline Llama-family base (issue 16.3): a real HF directory transformers loads, with a chat
template whose assistant part is marked for assistant-only loss; deterministic for a seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mlops

from mlops.errors import ConfigError
from mlops.training.offline_base import build_base, fingerprint

TEXTS = [f"What is {a} plus {b}? It is {a + b}." for a in range(12) for b in range(12)]
TINY = {"vocab_size": 320, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 128}
CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "It is 8."},
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("b") / "llama", TEXTS, arch="llama", **TINY)  # type: ignore[arg-type]


def test_directory_is_a_stock_hf_chat_model(llama: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in llama.iterdir()}
    want = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert want | {"generation_config.json"} <= names
    cfg = AutoConfig.from_pretrained(llama)
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads, cfg.hidden_act) == ("llama", 32, 1, "silu")
    tok = AutoTokenizer.from_pretrained(llama)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    assert (
        json.loads((llama / "tokenizer_config.json").read_text())["chat_template"]
        == (llama / "chat_template.jinja").read_text()
    )
    assert im_end in json.loads((llama / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(llama)
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 1_000_000

    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\nIt is 8.<|im_end|>\n")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    # the bytes round-trip through the BPE (byte-level: no unknown token), special tokens stay whole
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids.count(im_end) == 5
    # assistant-only loss: exactly the assistant answers and their end-of-turn are marked
    r = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(r["input_ids"], r["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "It is 5.<|im_end|>It is 8.<|im_end|>"
    out = model.generate(**tok(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=3)
    assert out.shape[1] <= len(tok(prompt, add_special_tokens=False)["input_ids"]) + 3


def test_same_seed_same_bytes_other_seed_other_weights(llama: Path, tmp_path: Path) -> None:
    again = build_base(tmp_path / "again", TEXTS, arch="llama", **TINY)  # type: ignore[arg-type]
    assert fingerprint(again) == fingerprint(llama)
    other = build_base(tmp_path / "other", TEXTS, arch="llama", seed=1, **TINY)  # type: ignore[arg-type]
    assert (other / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (llama / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_load(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_base(tmp_path / arch, TEXTS, arch=arch, **TINY)  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(path)
    c = model.config
    assert c.model_type == arch and getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) == 32
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    assert model(**enc).logits.shape[-1] == len(tok)


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'"),
        ({"vocab_size": 100}, "vocab_size 100 is under 259"),
        ({"num_heads": 3, "num_kv_heads": 2}, "multiple of num_kv_heads"),
        ({"head_dim": 24}, "head_dim 24"),
    ],
)
def test_bad_sizes_are_one_clear_error(kw: dict[str, object], says: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=says):
        build_base(tmp_path / "x", TEXTS, **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_cli_builds_from_a_chat_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(3)))
    r = mlops(
        "base", "build", "--arch", "qwen2", "--data", str(data), "--out", "bases/q", "--vocab-size", "300",
        "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "2", "--json", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "qwen2" and info["sha256"] == fingerprint(tmp_path / "bases" / "q")
    assert info["parameters"] > 10_000
    bad = mlops("base", "build", "--data", str(tmp_path / "nope.jsonl"), "--out", "b", cwd=tmp_path, timeout=300)
    assert bad.returncode == 1 and "nope.jsonl: cannot read" in bad.stderr
