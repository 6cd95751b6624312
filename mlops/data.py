"""Reading JSONL datasets of {input, expected} rows (training and evals alike); errors name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlops.errors import ConfigError


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    expected: str | None
    context: tuple[str, ...] = ()


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
            out.append(Example(str(row.get("id", f"{path.stem}-{n}")), row[input_field], target, tuple(ctx)))
    if not out:
        raise ConfigError(f"{path}: dataset is empty")
    return out
