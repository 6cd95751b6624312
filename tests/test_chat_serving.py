"""Chat on Llama-family models through the builtin engine (issue 16): the model's own template
(every turn, the system prompt, tools), stopping at its end-of-turn token, usage counted as vLLM
counts it, and greedy parity with `transformers` `generate`.

The chat model is an offline Llama base fine-tuned for a few seconds on a word-reversal chat task
(mlops.testing.chat_artifact), served by the real server app on 127.0.0.1. Qwen2 and Mistral
bases get a deterministic weight perturbation instead of training: enough for varied greedy text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlops.testing import CHAT_SYSTEM, CHAT_TOOL, chat_artifact, chat_conversations

WAIT_S = 120.0  # bound on one request on a loaded 2-core machine
MAX_TOKENS = 12
Chat = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]


def chats() -> list[Chat]:
    """Prompts for the next assistant turn: single and multi-turn, with and without a system
    prompt, one with tools, one with a tool call and its result."""
    out: list[Chat] = [(c[:-1], None) for c in chat_conversations(10, seed=7)]
    out.append(([{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": "refund order"}], [CHAT_TOOL]))
    call = {"id": "c1", "type": "function", "function": {"name": "refund", "arguments": '{"order": "ship"}'}}
    out.append(
        (
            [
                {"role": "user", "content": "refund order"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "late"},
                {"role": "user", "content": "card account"},
            ],
            None,
        )
    )
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_artifact(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def served(chat_model: Path) -> Iterator[str]:
    from mlops.serving.runner import start_server
    from mlops.serving.server import create_app
    from mlops.serving.standalone import alone

    with alone(chat_model, "chat-1", ("chat",)) as (pool, opts), start_server(create_app(pool, opts)) as url:
        yield url


def parsed_calls(message: dict[str, Any]) -> dict[str, Any]:
    """A turn as templates take it: tool-call arguments a dict, not the API's JSON string (the
    conversion vLLM makes before rendering)."""
    calls = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in message.get("tool_calls", [])
    ]
    return {**message, "tool_calls": calls} if calls else message


def reference(model_dir: Path, items: list[Chat], max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
    """transformers' own answer for each chat, one at a time: apply_chat_template, greedy generate;
    the ids made text as vLLM's detokenizer makes it (tokenizers' DecodeStream primed with the
    prompt: bytes of a character cut off by the end are dropped, where `decode` writes U+FFFD)."""
    import torch
    from tokenizers.decoders import DecodeStream
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = set(model.generation_config.eos_token_id)
    out = []
    for messages, tools in items:
        messages = [parsed_calls(m) for m in messages]
        enc = tok.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        n = enc["input_ids"].shape[1]
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)[0, n:].tolist()
        stream = DecodeStream(ids=enc["input_ids"][0].tolist(), skip_special_tokens=True)
        out.append(
            {
                "text": "".join(stream.step(tok.backend_tokenizer, t) or "" for t in ids),
                "finish_reason": "stop" if ids[-1] in eos else "length",
                "usage": {"prompt_tokens": n, "completion_tokens": len(ids), "total_tokens": n + len(ids)},
            }
        )
    return out


def ask(url: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "chat", "messages": messages, "max_tokens": MAX_TOKENS} | kw
    if tools is not None:
        body["tools"] = tools
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_chat_greedy_parity_with_transformers(served: str, chat_model: Path) -> None:
    """Every chat at once (one batch, left-padded, rotary positions per row) answers what
    transformers answers for it alone: text, finish reason and usage."""
    items = chats()
    want = reference(chat_model, items)
    with ThreadPoolExecutor(len(items)) as pool:
        got = list(pool.map(lambda c: ask(served, *c), items))
    seen = [
        {
            "text": g["choices"][0]["message"]["content"],
            "finish_reason": g["choices"][0]["finish_reason"],
            "usage": g["usage"],
        }  # fmt: skip
        for g in got
    ]
    differ = [(i, w, s) for i, (w, s) in enumerate(zip(want, seen, strict=True)) if w != s]
    assert not differ, f"{len(differ)}/{len(items)} differ, e.g. {differ[:3]}"
    texts = {w["text"] for w in want}
    assert len(texts) >= 4, f"degenerate greedy text, parity would mean little: {texts}"
    assert {w["finish_reason"] for w in want} >= {"stop"}  # the end-of-turn token ends a turn


def test_the_template_sees_every_turn_and_the_system_prompt(served: str, chat_model: Path) -> None:
    """The usage says the whole rendered conversation was the prompt: dropping the system prompt
    or the first turn changes it (the old route wrapped the last user turn only)."""
    conv = next(c[:-1] for c in chat_conversations(12, seed=3) if len(c) == 5)  # system + 2 turns
    full = ask(served, conv, None)["usage"]["prompt_tokens"]
    assert ask(served, conv[1:], None)["usage"]["prompt_tokens"] < full
    assert ask(served, [conv[0], *conv[3:]], None)["usage"]["prompt_tokens"] < full
    parts = [{"type": "text", "text": conv[-1]["content"]}, {"type": "text", "text": "late"}]
    joined = {**conv[-1], "content": conv[-1]["content"] + "\nlate"}  # vLLM's rule for text parts
    got = ask(served, [*conv[:-1], {"role": "user", "content": parts}], None)
    assert got["choices"][0]["message"]["content"] == reference(chat_model, [([*conv[:-1], joined], None)])[0]["text"]


def test_chat_streams_the_same_text(served: str) -> None:
    messages, tools = chats()[1]
    done = ask(served, messages, tools)
    body = {"model": "chat", "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    deltas, finish = [], None
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    assert "".join(deltas) == done["choices"][0]["message"]["content"]
    assert finish == done["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "each tool must be"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": 3, "content": "a"}]}, "string role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{nope"}}],
                    },
                ]
            },  # fmt: skip
            "arguments must be a JSON object",
        ),
    ],
)
def test_bad_chat_requests_are_400(served: str, body: dict[str, Any], message: str) -> None:
    r = httpx.post(f"{served}/v1/chat/completions", json={"model": "chat"} | body, timeout=WAIT_S)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_archs_batch_like_transformers(arch: str, tmp_path: Path) -> None:
    """Qwen2 and Mistral in the continuous batch: requests that join a batch already decoding
    (their caches left-padded to its length) answer what transformers answers for each alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlops.serving.engine import Engine, GenRequest
    from mlops.training.offline_base import build_base

    convs = chat_conversations(24, seed=11)
    model_dir = build_base(tmp_path / arch, [m["content"] for c in convs for m in c], arch=arch, vocab_size=300,
                           num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=128)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init at std 0.02 answers one token forever
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(model_dir)
    items = [(c[:-1], None) for c in convs[:8]]
    want = reference(model_dir, items)
    eng = Engine(model_dir, max_batch_size=16)
    try:
        reqs = [GenRequest(prompt="", messages=m, max_tokens=MAX_TOKENS) for m, _ in items]
        first = eng.submit(reqs[0])
        head = first.tokens.get(timeout=WAIT_S)  # the first request is decoding: the rest join it
        rest = [eng.submit(r) for r in reqs[1:]]
        texts = ["" if head is None else head + "".join(eng.stream(first, WAIT_S))]
        texts += ["".join(eng.stream(r, WAIT_S)) for r in rest]
    finally:
        eng.close()
    assert eng.prefills >= 2
    assert texts == [w["text"] for w in want]
    assert len(set(texts)) >= 3, texts
    assert [r.completion_tokens for r in reqs] == [w["usage"]["completion_tokens"] for w in want]


def test_eval_cases_canary_and_smoke_requests_take_the_chat_route(
    served: str, chat_model: Path, tmp_path: Path
) -> None:
    """A chat case's turns (and tools) go to /v1/chat/completions from the eval harness, the canary's
    traffic and the smoke request: the harness gets the template's answers, not the completion of
    the last user turn alone."""
    import asyncio
    import time

    from mlops.evals.harness import DiskCache, Endpoint, query_all
    from mlops.evals.types import Case
    from mlops.flows.stages import _smoke
    from mlops.rollout import _drive, read_stats

    items = [chats()[i] for i in (0, 3, 10)]  # system + user, two turns, tools
    cases = [Case(f"c{i}", m[-1]["content"], messages=tuple(m), tools=tuple(t or ())) for i, (m, t) in enumerate(items)]
    ep = Endpoint(served, "chat-1", "{input}", MAX_TOKENS, model="chat")
    outs, counts = asyncio.run(query_all(ep, cases, DiskCache(tmp_path)))
    assert counts.errors == 0, [o.error for o in outs]
    assert [o.text for o in outs] == [w["text"] for w in reference(chat_model, items)]

    since = time.time()
    asyncio.run(_drive(served, [m for m, _ in items], 6, MAX_TOKENS, 3, "chat", 0))
    window = read_stats(served, since)["releases"]["chat-1"]
    assert (window["requests"], window["errors"]) == (6, 0)  # a chat body on /v1/completions is a 400
    assert _smoke(served, "chat", messages=items[0][0]) == "chat-1"


def test_chat_stream_include_usage_ends_with_a_usage_chunk(served: str) -> None:
    """`stream_options.include_usage` (the openai client's way to count a stream): vLLM and OpenAI
    send one last chunk with no choices and the usage the non-streamed answer reports."""
    messages, tools = chats()[1]
    done = ask(served, messages, tools)
    body = {"model": "chat", "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if tools:
        body["tools"] = tools
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == done["usage"]
    assert all(c["choices"] for c in chunks[:-1])
