"""The data every metric sees: a case from a suite and the output the endpoint gave for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Case:
    """One eval case. `context`: retrieved contexts (RAG); `tags`: the slices (segments) it belongs to;
    `messages`: a chat case's turns before the answer (OpenAI message dicts), `input` its last user turn."""

    id: str
    input: str
    expected: str | None = None
    context: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()  # the slices a gate may name (`segment:`)
    messages: tuple[dict[str, Any], ...] = ()  # chat: the turns before the answer (mlops.data.Example)
    tools: tuple[dict[str, Any], ...] = ()  # chat: the tool schemas the conversation offers

    def prompt_text(self) -> str:
        """What a metric sees as the input: `input`, or for a multi-turn chat case every turn before the
        answer rendered as `role: content` lines, so a judge sees the whole conversation (a system
        prompt and earlier turns change what a good answer is)."""
        turns = [m for m in self.messages if isinstance(m.get("content"), str) and m["content"]]
        if len(turns) <= 1 and all(m.get("role") == "user" for m in turns):
            return self.input
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in turns)


@dataclass
class Output:
    text: str
    latency_s: float = 0.0
    error: str | None = None  # set when the call failed: the case fails every metric, never NaN
    release: str | None = None
    completion_tokens: int = 0
    cached: bool = False


@dataclass
class Score:
    """One metric on one case. `value` is always a finite float; a failure is 0 (or worst) + reason."""

    value: float
    reason: str | None = None
    failed: bool = False
    samples: tuple[float, ...] = ()  # a judge with `repeat: N`: each repetition's value (`value` is their median)


@runtime_checkable
class Metric(Protocol):
    name: str
    higher_is_better: bool

    def score_batch(self, cases: list[Case], outputs: list[Output]) -> list[Score]: ...
