"""A Llama-family base made offline: random weights, a byte-level BPE tokenizer trained on your
text, ChatML special tokens and a chat template, saved as a stock Hugging Face directory.

Nothing may be downloaded here, so tests and the chat example build their base instead of fetching
one. The directory is what a real base looks like to every consumer (transformers, TRL, peft, the
builtin engine, vLLM): config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with
`chat_template`), chat_template.jinja and generation_config.json (eos includes `<|im_end|>`).

Choices that keep it servable by vLLM-CPU: head_dim 32 (its CPU attention refuses 24), fp32 weights,
no sliding window, plain rotary positions. The assistant part of the template sits inside
`{% generation %}` so `apply_chat_template(return_assistant_tokens_mask=True)` (TRL's assistant-only
loss) can tell which tokens to learn from. Deterministic: the same texts, sizes and seed give the
same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlops.errors import ConfigError

ARCHS = ("llama", "qwen2", "mistral")
IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL = (EOT, IM_START, IM_END)  # ids 0, 1, 2

# ChatML, as Qwen2 uses it. Tools: their JSON schemas go into the system turn, an assistant's
# tool_calls are written as <tool_call> JSON lines, and tool results are their own `tool` turn.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- 'Tools:' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- generation %}
{{- message['content'] or '' }}
{%- for call in message.get('tool_calls') or [] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{{- '<tool_call>\\n{"name": "' + fn['name'] + '", "arguments": ' }}
{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>' }}
{%- endgeneration %}
{{- '\\n' }}
{%- elif message['role'] != 'system' or (not loop.first) %}
{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2/Llama-3 style: any text encodes, no unknown token) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    floor = 256 + len(SPECIAL)
    if vocab_size < floor:
        raise ConfigError(f"vocab_size {vocab_size} is under {floor} (256 bytes + {len(SPECIAL)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the role names and newlines the template writes are learnt too, so a rendered chat is compact
    chat_words = ["system\n", "user\n", "assistant\n", "tool\n", "<tool_call>\n", "\n</tool_call>"]
    tok.train_from_iterator([*chat_words, *texts], trainer=trainer)
    return tok


def _config(arch: str, vocab: int, sizes: dict[str, int], tie: bool) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    hidden, heads, kv, head_dim = sizes["hidden_size"], sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    if heads % kv:
        raise ConfigError(f"num_heads {heads} must be a multiple of num_kv_heads {kv} (grouped-query attention)")
    if arch == "qwen2" and hidden != heads * head_dim:
        raise ConfigError(
            f"qwen2: hidden_size must be num_heads * head_dim ({heads} * {head_dim} = {heads * head_dim})"
        )
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": sizes["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": SPECIAL.index(EOT),
        "eos_token_id": SPECIAL.index(IM_END),
        "pad_token_id": SPECIAL.index(EOT),
        "dtype": "float32",
    }
    if arch == "llama":
        return LlamaConfig(head_dim=head_dim, **common)
    if arch == "mistral":
        return MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    return Qwen2Config(use_sliding_window=False, sliding_window=None, **common)


def build_base(
    out_dir: Path | str,
    texts: Iterable[str],
    arch: str = "llama",
    vocab_size: int = 1024,
    hidden_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random-initialised `arch` model with a BPE tokenizer trained on `texts` to `out_dir`.

    `hidden_size` defaults to num_heads * head_dim and `intermediate_size` to ~8/3 of it (SwiGLU's
    usual ratio, rounded up to a multiple of 16). Returns `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r} (valid: {', '.join(ARCHS)})")
    if head_dim == 24:  # vLLM-CPU's attention kernels take head sizes in multiples of 32
        raise ConfigError("head_dim 24 cannot be served by vLLM-CPU; use 32 or 64")
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError("no text to train the tokenizer on")
    hidden = hidden_size or num_heads * head_dim
    inter = intermediate_size or -(-hidden * 8 // 3 // 16) * 16
    sizes = {
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": inter,
        "max_position_embeddings": max_position_embeddings,
    }
    if min(sizes.values()) < 1:
        raise ConfigError(f"every size must be at least 1: {sizes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(texts, vocab_size)
    config = _config(arch, tok.get_vocab_size(), sizes, tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):  # the caller's random streams are left as they were
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # The (tied) embeddings at std hidden**-0.5 instead of 0.02: a unit-norm output row lets the
        # logits spread once the hidden state points its way. At 0.02 they cannot pass ~1 whatever the
        # layers do, so a LoRA fine-tune (embeddings and norms frozen) plateaus near uniform loss.
        torch.nn.init.normal_(model.get_input_embeddings().weight, 0.0, hidden**-0.5)
        if not tie_word_embeddings:
            torch.nn.init.normal_(model.get_output_embeddings().weight, 0.0, hidden**-0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[SPECIAL.index(IM_END), SPECIAL.index(EOT)],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(str(out), safe_serialization=True)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    template_in_config(out, CHAT_TEMPLATE)
    return out


def template_in_config(out: Path, template: str) -> None:
    """transformers 5 saves the template only as chat_template.jinja; older readers (and some servers)
    look in tokenizer_config.json, so it is written in both places."""
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = template
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class every transformers version has
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(template)


def texts_of(rows: Iterable[Any]) -> list[str]:
    """Every string in parsed dataset rows (message contents, inputs, answers, contexts), in order."""
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            found.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    for r in rows:
        walk(r)
    return found


def read_texts(path: Path) -> list[str]:
    """The text of a JSONL dataset of any format, for the tokenizer; errors name the line."""
    rows: list[Any] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return texts_of(rows)


def fingerprint(base_dir: Path | str) -> str:
    """sha256 over a base directory's files (names and bytes), for the lineage of what trains on it."""
    import hashlib

    from mlops.datasources import sha256_path  # chunked: a real base's weights are gigabytes

    root = Path(base_dir)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_path(p)}\0".encode())
    return h.hexdigest()
