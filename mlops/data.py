"""The one dataset reader: every format (pairs, chat, completion) from every source (mlops/datasources.py)
becomes typed rows (`Example`); training, evals, data checks and the plan's fingerprint read through it.

A bad row is one ConfigError naming where it is and which field: `data/chat.jsonl:3: messages[1].role:
unknown role 'bot' (valid: system, user, assistant, tool)`; Parquet, CSV and Hugging Face rows are
named by their 0-based row index (`data/x.parquet: row 2: ...`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops import datasources
from mlops.datasources import CONTEXT_KEYS, EmptyDataset, RowError, Rows

if TYPE_CHECKING:
    from mlops.config import Loaded

FORMATS = ("pairs", "chat", "completion")
OPTIONAL = frozenset(("id", "tags", *CONTEXT_KEYS))  # keys any row may carry
ROLES = ("system", "user", "assistant", "tool")


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

    def to_row(self) -> dict[str, Any]:
        """This example as a JSONL row of its own format, which reads back to an equal Example."""
        row: dict[str, Any] = {"id": self.id}
        if self.format == "chat":
            row["messages"] = self.conversation()
            if self.tools:
                row["tools"] = list(self.tools)
        elif self.format == "completion":
            row |= {"prompt": self.input, "completion": self.expected}
        else:
            row |= {"input": self.input, "expected": self.expected}
        if self.context:
            row["context"] = list(self.context)
        if self.tags:
            row["tags"] = list(self.tags)
        return row


def detect_format(row: Any) -> str:
    """A row's format when the config declares none: `messages` -> chat, `prompt` and `completion` ->
    completion, anything else -> pairs."""
    if isinstance(row, dict):
        if "messages" in row:
            return "chat"
        if "prompt" in row and "completion" in row:
            return "completion"
    return "pairs"


def _strs(value: Any, field: str, fail: Any) -> tuple[str, ...]:
    """A list of strings, or one string; None is none."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise fail(field, f"must be a list of strings, not {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _common(row: dict[str, Any], default_id: str, fail: Any) -> dict[str, Any]:
    rid = row.get("id")
    if rid is not None and not isinstance(rid, str | int):
        raise fail("id", f"must be a string or an integer, not {_kind(rid)}")
    ctx: tuple[str, ...] = ()
    for key in CONTEXT_KEYS:
        if row.get(key) is not None:
            ctx = _strs(row[key], key, fail)
            break
    return {"id": default_id if rid is None else str(rid), "context": ctx, "tags": _strs(row.get("tags"), "tags", fail)}


def _message(m: Any, i: int, fail: Any) -> dict[str, Any]:
    at = f"messages[{i}]"
    if not isinstance(m, dict):
        raise fail(at, f"must be an object with role and content, not {_kind(m)}")
    m = {k: v for k, v in m.items() if v is not None}  # Parquet/HF fill absent struct keys with null
    role = m.get("role")
    if role not in ROLES:
        raise fail(f"{at}.role", f"unknown role {role!r} (valid: {', '.join(ROLES)})")
    calls = m.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise fail(f"{at}.tool_calls", "must be a list, on an assistant turn")
    content = m.get("content")
    if content is None and calls:
        pass  # an assistant turn that only calls tools
    elif not isinstance(content, str):
        raise fail(f"{at}.content", f"must be a string, not {_kind(content)}")
    elif not content.strip() and not calls:
        raise fail(f"{at}.content", f"empty {role} turn")
    if "name" in m and not isinstance(m["name"], str):
        raise fail(f"{at}.name", f"must be a string, not {_kind(m['name'])}")
    return m


def _chat(row: dict[str, Any], default_id: str, training: str | None, fail: Any) -> Example:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise fail("messages", "must be a non-empty list of {role, content} turns")
    turns = [_message(m, i, fail) for i, m in enumerate(msgs)]
    expected: str | None = None
    if turns[-1]["role"] == "assistant":
        final = turns.pop()
        if not isinstance(final.get("content"), str) or final.get("tool_calls"):
            raise fail(f"messages[{len(turns)}]", "the final assistant turn needs text content, not only tool calls")
        expected = final["content"]
    elif training is not None:
        last = turns[-1]["role"]
        raise fail(
            "messages", f"no assistant turn to learn from ({training}; the conversation ends on a {last!r} turn)"
        )
    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users:
        raise fail("messages", "no user turn before the answer")
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise fail("tools", f"must be a list of objects, not {_kind(tools)}")
    return Example(
        input=users[-1], expected=expected, messages=tuple(turns), tools=tuple(tools or ()), format="chat",
        **_common(row, default_id, fail),
    )  # fmt: skip


def _text(row: dict[str, Any], fmt: str, in_f: str, out_f: str, default_id: str, fail: Any) -> Example:
    if not isinstance(row.get(in_f), str):
        if fmt == "pairs":  # today's message, kept word for word
            raise fail(None, f"each line needs a string field {in_f!r}")
        raise fail(in_f, f"must be a string, not {_kind(row.get(in_f))}")
    target = row.get(out_f)
    if target is not None and not isinstance(target, str):
        raise fail(None if fmt == "pairs" else out_f, f"field {out_f!r} must be a string")
    if OPTIONAL.isdisjoint(row):  # most rows: nothing more to check (20k rows: as fast as before)
        return Example(default_id, row[in_f], target, format=fmt)
    return Example(input=row[in_f], expected=target, format=fmt, **_common(row, default_id, fail))


def parse_row(
    row: Any,
    fmt: str,
    where: str | Rows,
    default_id: str,
    input_field: str = "input",
    target_field: str = "expected",
    training: str | None = None,
    row_number: int = 0,
) -> Example:
    """One raw row (a JSON object, a Parquet/CSV/HF record) as an Example of format `fmt`.
    `training` names the training set the row is read for (`training set 'train'`): its conversations
    must end on an answer. `where` names the row in errors (given as Rows, it is formatted only then)."""

    def fail(field: str | None, msg: str) -> RowError:
        detail = f"{field}: {msg}" if field else msg
        at = where.where(row_number) if isinstance(where, Rows) else where
        return RowError(f"{at}: {detail}", row_number, detail)

    if not isinstance(row, dict):
        raise fail(None, f"a row must be a JSON object, not {_kind(row)}")
    if fmt == "chat":
        return _chat(row, default_id, training, fail)
    if fmt == "completion":
        return _text(row, fmt, "prompt", "completion", default_id, fail)
    return _text(row, fmt, input_field, target_field, default_id, fail)


def parse_rows(
    raw: Iterable[tuple[int, Any]],
    rows: Rows,
    stem: str,
    fmt: str | None = None,
    input_field: str = "input",
    target_field: str = "expected",
    training: str | None = None,
) -> list[tuple[int, Example]]:
    """(line or row number, Example) for every raw row; the format is detected from the first row
    when `fmt` is None. The default id of a row is `<stem>-<number>`, as it always was."""
    out: list[tuple[int, Example]] = []
    for n, row in raw:
        fmt = fmt or detect_format(row)
        out.append((n, parse_row(row, fmt, rows, f"{stem}-{n}", input_field, target_field, training, n)))
    if not out:
        raise EmptyDataset(f"{rows.label}: dataset is empty")
    return out


def read_source(
    source: str | Path,
    fmt: str | None = None,
    input_field: str = "input",
    target_field: str = "expected",
    *,
    training: str | None = None,
    root: Path | None = None,
    cache: Path | None = None,
) -> list[Example]:
    """Every row of one source (a local file or directory, `hf:org/name[:split]`, `s3://bucket/key`)."""
    return [ex for _, ex in read_numbered(source, fmt, input_field, target_field, training, root, cache)]


def read_numbered(
    source: str | Path,
    fmt: str | None = None,
    input_field: str = "input",
    target_field: str = "expected",
    training: str | None = None,
    root: Path | None = None,
    cache: Path | None = None,
) -> list[tuple[int, Example]]:
    """`read_source` with each row's line (JSONL) or 0-based row index (Parquet, CSV, HF)."""
    raw, rows, stem = datasources.open_rows(str(source), root or Path.cwd(), cache)
    return parse_rows(raw, rows, stem, fmt, input_field, target_field, training)


def training_set(loaded: Loaded, name: str) -> str | None:
    """How errors name `name` when a model trains on it (its conversations must end on an answer)."""
    return f"training set {name!r}" if any(m.dataset == name for m in loaded.cfg.models.values()) else None


def read_dataset(loaded: Loaded, name: str) -> list[Example]:
    """`datasets.<name>` of the config as typed rows, whatever its format and source."""
    return [ex for _, ex in read_dataset_numbered(loaded, name)]


def read_dataset_numbered(loaded: Loaded, name: str) -> list[tuple[int, Example]]:
    ds = loaded.cfg.datasets[name]
    cache = datasources.cache_dir(loaded)
    return read_numbered(
        ds.path, ds.format, ds.input_field, ds.target_field, training_set(loaded, name), loaded.root, cache
    )


def read_jsonl(path: Path, input_field: str = "input", target_field: str = "expected") -> list[Example]:
    """A local JSONL file of pairs (or any format, detected): kept for callers that have only a path."""
    return read_source(path, None, input_field, target_field)


def to_jsonl(examples: Iterable[Example]) -> bytes:
    """Rows as JSONL in their own formats (what a remote trainer reads when the source is not a file)."""
    return b"".join(json.dumps(ex.to_row(), ensure_ascii=False).encode() + b"\n" for ex in examples)
