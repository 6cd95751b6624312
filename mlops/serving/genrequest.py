"""A generation request as every engine takes it, and the ways an engine refuses one.

Whatever could fail inside a running batch (a seed torch cannot take, a prompt that is not valid
Unicode or does not fit the context) is checked before the request joins the batch, so one bad
request fails alone (it was failing half of the 48 requests batched with it).
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue is full: the server answers 503 with Retry-After."""


class EngineClosed(Overloaded):
    """The engine is draining (its release left the routing): route the request again."""


class BadRequest(ValueError):
    """This request cannot be served as asked (prompt longer than the context, a seed torch cannot
    take, ...): the server answers 400 and the request never joins a batch."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# torch.Generator.manual_seed takes any integer in [-2**63, 2**64); beyond it raises inside a batch.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(eq=False)
class GenRequest:
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Filled by the engine, from its thread. `sink` gets each text piece, then None when finished;
    # without a sink the pieces go to `tokens`. `on_done` (if set) is called once at the end.
    tokens: queue.SimpleQueue[str | None] = field(default_factory=queue.SimpleQueue)
    sink: Callable[[str | None], Any] | None = None
    on_done: Callable[[GenRequest], Any] | None = None
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    error: str | None = None
    cancelled: bool = False
    finished: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    prompt_ids: list[int] | None = None  # set by `Engine.submit` (validated against the context)
    # A chat request's turns and tools (OpenAI dicts, shapes checked by the server). An engine whose
    # model has a chat template renders them; `prompt` is the fallback for a model without one.
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    # The LoRA adapter (an adapter release, loaded into a shared base) this request runs with; set
    # by that release's view (mlops/serving/adapters.py). None: the engine's own model.
    adapter: str | None = None


def check_params(req: GenRequest, context: int) -> None:
    """Raise BadRequest for what would fail inside a batch, on any engine (`context`: the model's
    positions). The engine then checks the prompt's tokens against the context."""
    if not isinstance(req.max_tokens, int) or isinstance(req.max_tokens, bool) or req.max_tokens < 1:
        raise BadRequest("max_tokens must be an integer of at least 1", "max_tokens")
    if req.max_tokens > context:
        raise BadRequest(f"max_tokens must be at most {context} (the model's context)", "max_tokens")
    t = req.temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        raise BadRequest("temperature must be a finite number of at least 0", "temperature")
    if req.seed is not None and (
        not isinstance(req.seed, int) or isinstance(req.seed, bool) or not SEED_MIN <= req.seed <= SEED_MAX
    ):
        raise BadRequest("seed must be an integer in [-2^63, 2^64)", "seed")
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("prompt is not valid Unicode (a lone surrogate?)", "prompt") from None


def check_request(req: GenRequest, tok: Any, context: int, max_token_chars: int, text: str | None = None) -> None:
    """Every engine's rules (so all answer the same 400s): parameters, then the prompt's tokens
    against the context, refusing an oversized prompt before tokenizing it; sets `prompt_ids`.
    `tok` is a `tokenizers.Tokenizer`; `max_token_chars` its longest token's length in characters;
    `text` what to tokenize when it is not `req.prompt` (a rendered chat: its special tokens are
    written as text and tokenized as the special tokens they name, as vLLM does)."""
    check_params(req, context)
    if text is None:
        text = req.prompt
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("messages are not valid Unicode (a lone surrogate?)", "messages") from None
    room = context - 1  # at least one position is left to generate into
    if len(text) > room * max_token_chars:
        raise BadRequest(f"prompt is longer than the model's context ({context} tokens)", "prompt")
    try:
        ids = tok.encode(text, add_special_tokens=False).ids
    except Exception as e:
        raise BadRequest(f"prompt cannot be tokenized: {type(e).__name__}", "prompt") from None
    if len(ids) > room:
        raise BadRequest(
            f"prompt has {len(ids)} tokens; this model's context is {context} (at most {room} for the prompt)",
            "prompt",
        )
    req.prompt_ids = ids
