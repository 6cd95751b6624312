"""The one reader (mlops.data): every format from every source becomes typed rows; a bad row is one
line naming where and which field; the plan's fingerprint covers every source; data checks see chat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlops.data import Example, read_numbered, read_source
from mlops.errors import ConfigError

CHAT = [
    {
        "id": "c1",
        "messages": [
            {"role": "system", "content": "You answer billing questions."},
            {"role": "user", "content": "What is my balance?"},
            {"role": "assistant", "content": "Which account?"},
            {"role": "user", "content": "Checking."},
            {"role": "assistant", "content": "It is 10 EUR."},
        ],
        "tags": ["billing"],
        "retrieval_context": ["Checking: 10 EUR"],
    },
    {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function"}]},
            {"role": "tool", "content": "sunny", "name": "weather"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "tags": "weather",
    },
]
COMPLETION = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6", "id": 7}]
PAIRS = [{"input": "abc", "expected": "cba", "context": "ctx"}, {"input": "xy", "expected": "yx"}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def check_chat(rows: list[Example]) -> None:
    a, b = rows
    assert a.format == "chat" and a.id == "c1"
    assert a.input == "Checking." and a.expected == "It is 10 EUR."
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user"]
    assert a.conversation()[-1] == {"role": "assistant", "content": "It is 10 EUR."}
    assert a.tags == ("billing",) and a.context == ("Checking: 10 EUR",)
    assert b.input == "Weather?" and b.expected == "Sunny." and b.tags == ("weather",)
    assert [m["role"] for m in b.messages] == ["user", "assistant", "tool"]
    assert b.tools[0]["function"]["name"] == "weather"


def test_jsonl_formats_are_detected(tmp_path: Path) -> None:
    check_chat(read_source(write_jsonl(tmp_path / "chat.jsonl", CHAT)))
    comp = read_source(write_jsonl(tmp_path / "comp.jsonl", COMPLETION))
    assert [(e.format, e.id, e.input, e.expected) for e in comp] == [
        ("completion", "comp-1", "2+2=", "4"),
        ("completion", "7", "3+3=", "6"),
    ]
    pairs = read_source(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert pairs[0] == Example("p-1", "abc", "cba", ("ctx",))
    # a declared format wins over detection, and pairs keep their configurable fields
    q = read_source(write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}]), "pairs", "q", "a")
    assert (q[0].input, q[0].expected) == ("a", "b")


def test_an_eval_conversation_may_end_on_a_user_turn(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    (ex,) = read_source(write_jsonl(tmp_path / "e.jsonl", [row]))
    assert ex.expected is None and ex.input == "hi" and len(ex.messages) == 2
    with pytest.raises(ConfigError) as e:
        read_source(tmp_path / "e.jsonl", training="training set 'train'")
    assert str(e.value) == (
        "e.jsonl:1: messages: no assistant turn to learn from (training set 'train'; "
        "the conversation ends on a 'user' turn)"
    ).replace("e.jsonl", str(tmp_path / "e.jsonl"))


def U(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


A = {"role": "assistant", "content": "ok"}

BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}, A]}, "chat", "messages[0].role: unknown role 'bot'"),
    ({"messages": [U("   "), A]}, "chat", "messages[0].content: empty user turn"),
    ({"messages": [U(["x"]), A]}, "chat", "messages[0].content: must be a string, not list"),
    ({"messages": "hi"}, "chat", "messages: must be a non-empty list"),
    ({"messages": [A]}, "chat", "messages: no user turn before the answer"),
    ({"messages": [U("x"), A], "tags": [1]}, "chat", "tags: must be a list of strings, not list"),
    ({"messages": [U("x"), A], "tools": {"a": 1}}, "chat", "tools: must be a list of objects, not dict"),
    ({"messages": [U("x"), A], "context": [None]}, "chat", "context: must be a list of strings"),
    ({"messages": [U("x"), "hi"]}, "chat", "messages[1]: must be an object"),
    ([1, 2], "chat", "a row must be a JSON object, not list"),
    ({"prompt": 3, "completion": "x"}, "completion", "prompt: must be a string, not int"),
    ({"prompt": "p", "completion": 3}, "completion", "completion: field 'completion' must be a string"),
    ({"input": 3, "expected": "x"}, "pairs", "each line needs a string field 'input'"),
    ({"input": "x", "expected": "y", "id": [1]}, "pairs", "id: must be a string or an integer"),
]


@pytest.mark.parametrize(("row", "fmt", "msg"), BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_line_and_field(tmp_path: Path, row: Any, fmt: str, msg: str) -> None:
    good = {"chat": CHAT[0], "completion": COMPLETION[0], "pairs": PAIRS[0]}[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", row])
    with pytest.raises(ConfigError) as e:
        read_source(path, fmt if fmt != "chat" else None)
    text = str(e.value)
    assert text.startswith(f"{path}:3: {msg}") and "\n" not in text


def test_invalid_json_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.jsonl:2: invalid JSON"):
        read_source(write_jsonl(tmp_path / "x.jsonl", [PAIRS[0], "{nope"]))
    with pytest.raises(ConfigError, match="dataset is empty"):
        read_source(write_jsonl(tmp_path / "y.jsonl", [""]))
    numbered = read_numbered(write_jsonl(tmp_path / "z.jsonl", ["", PAIRS[0], "", PAIRS[1]]))
    assert [n for n, _ in numbered] == [2, 4]
