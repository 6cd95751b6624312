"""What a model directory says about chat: its template, its special tokens, its end-of-turn ids.

A chat request on a model with a template is rendered the way `transformers`' `apply_chat_template`
and vLLM render it (vLLM calls that same function): every turn, the system prompt, `tools`,
`add_generation_prompt=True`, the tokenizer's special tokens as template variables; then tokenized
without adding special tokens (the template writes them). A model without a template (the GPT-2
trained from scratch) keeps the prompt template around the last user turn.

Generation stops at any of vLLM's stop ids: the tokenizer's `eos_token` and every id in
`generation_config.json`'s `eos_token_id` (an int or a list; a chat model lists its end-of-turn
token there), falling back to config.json's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The tokenizer's special tokens a template may use by name (transformers passes these).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A model's chat template, rendered as transformers renders it."""

    def __init__(self, source: str, special: dict[str, str]) -> None:
        self.source = source
        self.special = special

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template of `model_dir` (chat_template.jinja first, as transformers 5 saves it, then
        tokenizer_config.json's `chat_template`), or None when it has none."""
        root = Path(model_dir)
        cfg = _read(root / "tokenizer_config.json")
        special = {k: t for k in SPECIAL_KEYS if (t := _token(cfg.get(k))) is not None}
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            return cls(jinja.read_text(encoding="utf-8"), special)
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return cls(source, special) if isinstance(source, str) and source else None

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt for the assistant's next turn. Raises whatever the template raises."""
        from transformers.utils import chat_template_utils

        render: Any = chat_template_utils.render_jinja_template  # its stubs type every kwarg as a flag
        rendered, _ = render(
            conversations=[messages],
            tools=tools,
            chat_template=self.source,
            add_generation_prompt=True,
            **self.special,
        )
        return str(rendered[0])


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def stop_ids(model_dir: str | Path, tok: Any, config_eos: Any = None) -> list[int]:
    """The token ids that end a generation (see the module doc), the primary one first.
    `tok` is the `tokenizers.Tokenizer`; `config_eos` config.json's eos_token_id."""
    root = Path(model_dir)
    gen = _read(root / "generation_config.json")
    found: list[int] = []
    eos_text = _token(_read(root / "tokenizer_config.json").get("eos_token"))
    if eos_text is not None and (t := tok.token_to_id(eos_text)) is not None:
        found.append(int(t))
    found += _ids(gen.get("eos_token_id")) or _ids(config_eos)
    return list(dict.fromkeys(found)) or [0]
