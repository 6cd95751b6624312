"""The chat recipe's data: conversations rendered with the base's own chat template, loss on the
assistant tokens only, over-long conversations truncated or dropped (and counted), optional packing.

What comes from TRL and transformers, and why the rest is here:
- the assistant mask is transformers' `apply_chat_template(return_assistant_tokens_mask=True)`, the
  same call TRL's SFTTrainer makes for `assistant_only_loss` (it needs `{% generation %}` in the
  template; a template without it is refused with one line, not trained on every token);
- packing is TRL's `pack_dataset` (best-fit decreasing, sequence boundaries kept), and batches are
  padded by TRL's `DataCollatorForLanguageModeling` (position ids restart at each packed sequence);
- the loop itself stays the project's (train.py): resume by fingerprint with bitwise RNG state,
  checkpoints committed to a Modal Volume, the progress callback and the run record are what
  SFTTrainer (a transformers Trainer) would each do differently, and the benchmark
  (benchmarks/bench_chat_train.py) shows the plain loop is not slower.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlops.data import Example
from mlops.errors import ConfigError


@dataclass
class ChatData:
    rows: list[dict[str, list[int]]]  # input_ids + labels (-100 off the assistant turns); packed: + seq_lengths
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    packed: bool = False
    record: dict[str, Any] = field(default_factory=dict)


def check_template(tok: Any, base: str) -> None:
    """The base must have a chat template that marks the assistant's part (`{% generation %}`)."""
    template = tok.chat_template
    if not template:
        raise ConfigError(
            f"base {base!r} has no chat template, so chat data cannot be rendered for it "
            "(build a base with one: mlops base build --arch llama --data <chat.jsonl> --out <dir>)"
        )
    if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        raise ConfigError(
            f"base {base!r}: its chat template does not mark the assistant turns with "
            "{% generation %}...{% endgeneration %}, which assistant-only loss needs"
        )


def encode_one(tok: Any, ex: Example) -> dict[str, list[int]]:
    """One conversation as token ids and labels: a token is learnt only inside an assistant turn."""
    out = tok.apply_chat_template(
        ex.conversation(),
        tools=list(ex.tools) or None,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    labels = [t if m else -100 for t, m in zip(ids, out["assistant_masks"], strict=True)]
    return {"input_ids": ids, "labels": labels}


def encode_chats(tok: Any, examples: Sequence[Example], limit: int, truncation: str, packing: bool) -> ChatData:
    """Every conversation rendered and masked; over `limit` tokens: cut at the end (`truncate`, what
    is left must still hold an assistant token) or left out (`drop`). Packed rows hold several."""
    data = ChatData(rows=[], conversations=len(examples), packed=packing)
    for ex in examples:
        row = encode_one(tok, ex)
        if not any(lbl != -100 for lbl in row["labels"]):
            raise ConfigError(f"{ex.id}: the chat template rendered no assistant token to learn from")
        if len(row["input_ids"]) > limit:
            # keep the start (system prompt, first turns), as TRL's default `keep_start`
            row = {k: v[:limit] for k, v in row.items()}
            if truncation == "drop" or all(lbl == -100 for lbl in row["labels"][1:]):
                data.dropped += 1
                continue
            data.truncated += 1
        data.rows.append(row)
    if not data.rows:
        raise ConfigError(
            f"every conversation is over train.max_seq_len ({limit} tokens) and was dropped "
            "(raise max_seq_len, or truncation: truncate)"
        )
    if packing:
        data.rows = pack(data.rows, limit)
    data.record = {
        "format": "chat",
        "conversations": data.conversations,
        "truncated": data.truncated,
        "dropped": data.dropped,
        "packed": packing,
        "sequences": len(data.rows),
    }
    return data


def pack(rows: list[dict[str, list[int]]], limit: int) -> list[dict[str, list[int]]]:
    """TRL's best-fit-decreasing packing: whole conversations into rows of at most `limit` tokens."""
    import datasets
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()  # a bar per map call, on a list held in memory: noise in the run log
    ds = pack_dataset(datasets.Dataset.from_list(rows), limit, "bfd")
    return [{k: list(v) for k, v in r.items()} for r in ds.to_list()]


def collator(pad_id: int, packed: bool) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    """Right-padded batches from TRL's collator. Without an attention mask: with right padding a causal
    model never lets a real token see a pad (and pads carry no label), so SDPA takes its causal fast
    path; packed rows pass position ids, from which transformers masks each sequence off the others."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id, return_position_ids=packed)

    def call(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        out = collate(batch)
        out.pop("attention_mask", None)
        return dict(out)

    return call
