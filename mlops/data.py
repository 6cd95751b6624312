"""Reading JSONL datasets of {input, expected} rows (training and evals alike); errors name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One row of any dataset format, as training, evals and data checks all see it.

    - pairs: `input` / `expected` as written.
    - completion: `input` is the prompt, `expected` the completion.
    - chat (OpenAI fine-tuning format): `messages` is the conversation up to, not including, its final
      assistant turn (system, user, earlier assistant and tool turns, each an OpenAI message dict);
      `input` is the last user turn's content and `expected` the final assistant turn's content
      (None when the conversation ends on a user turn: an eval case with no reference).
    `context` holds retrieved contexts (RAG), `tags` name the slices a gate may look at.
    """

    id: str
    input: str
    expected: str | None
    context: tuple[str, ...] = ()
    messages: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    format: str = "pairs"

    def conversation(self) -> list[dict[str, Any]]:
        """The whole chat to learn from: the prompt turns plus the final assistant answer."""
        turns = [dict(m) for m in self.messages]
        if self.expected is not None:
            turns.append({"role": "assistant", "content": self.expected})
        return turns


def read_jsonl(path: Path, input_field: str = "input", target_field: str = "expected") -> list[Example]:
    out: list[Example] = []
    try:
        fh = path.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get(input_field), str):
                raise ConfigError(f"{path}:{n}: each line needs a string field {input_field!r}")
            target = row.get(target_field)
            if target is not None and not isinstance(target, str):
                raise ConfigError(f"{path}:{n}: field {target_field!r} must be a string")
            ctx = row.get("context") or ()
            if isinstance(ctx, str):
                ctx = (ctx,)
            tags = row.get("tags") or ()
            if isinstance(tags, str):
                tags = (tags,)
            if not isinstance(tags, list | tuple) or not all(isinstance(t, str) and t for t in tags):
                raise ConfigError(f"{path}:{n}: field 'tags' must be a list of non-empty strings")
            rid = str(row.get("id", f"{path.stem}-{n}"))
            out.append(Example(rid, row[input_field], target, tuple(ctx), tags=tuple(tags)))
    if not out:
        raise ConfigError(f"{path}: dataset is empty")
    return out
