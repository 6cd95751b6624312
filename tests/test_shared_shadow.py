"""The Modal gateway's shadow pairs (mlops/serving/shared_shadow.py), shared by two containers
through one store as a `modal.Dict` shares them: the merged window has the local server's shape,
a mirrored request still running in a live container is pending, one in a container gone is not."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from mlops.serving.shadow import Pair, Shadow
from mlops.serving.shared_shadow import SharedShadow, answer_text, streamed_text
from mlops.serving.shared_stats import SharedStats


def test_two_containers_pairs_merge_in_the_local_servers_shape() -> None:
    store: dict[str, Any] = {}
    lock = threading.Lock()

    def put(key: str, value: Any) -> None:
        with lock:
            store[key] = json.loads(json.dumps(value))  # values cross as JSON, as Modal pickles them

    def items(prefix: str) -> dict[str, Any]:
        with lock:
            return {k: v for k, v in store.items() if k.startswith(prefix)}

    now = [1000.0]
    stats = [SharedStats(put, items, container=c, clock=lambda: now[0], flush_s=0.2) for c in ("a", "b")]
    a, b = (SharedShadow(s, timeout=5.0, clock=lambda: now[0]) for s in stats)

    async def scenario() -> None:
        hold = asyncio.Event()

        async def post(release: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
            assert release == "cand" and body["model"] == "cand" and body["stream"] is False
            assert "stream_options" not in body
            if body["prompt"] == "slow":
                await hold.wait()
            if body["prompt"] == "bad":
                return 500, b'{"error": {"message": "boom"}}'
            return 200, json.dumps({"choices": [{"index": 0, "text": f"re:{body['prompt']}"}]}).encode()

        def ask(sh: SharedShadow, prompt: str, status: int, text: str = "") -> None:
            body = {"model": "tiny", "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
            m = sh.mirror("cand", "/v1/completions", body, post)
            answer = {"choices": [{"text": text}]} if status == 200 else {"error": {"message": "no"}}
            m.answered(status, json.dumps(answer).encode(), time.perf_counter())

        ask(a, "same", 200, "re:same")  # both agree
        ask(a, "bad", 200, "re:bad")  # the candidate fails
        ask(b, "x", 503)  # production fails: paired, never counted against the candidate
        ask(b, "y", 400)  # a bad request: production's 4xx, no pair
        ask(b, "slow", 200, "re:slow")  # still running
        deadline = time.monotonic() + 30
        while a.pending or b.pending > 1:
            assert time.monotonic() < deadline, (a.pending, b.pending)
            await asyncio.sleep(0.01)
        stats[1].flush()
        doc = a.live(stats[0], 0.0)
        sh = doc["shadow"]["cand"]
        assert doc["shadow_pending"] == 1 and sh["mirrored"] == 3 and sh["errors"] == 1, doc
        assert sh["error_rate"] == 1 / 3 and sh["agreement"] == 1 / 3, sh
        bad = [d for d in sh["disagreements"] if d["error"]]
        assert [d["error"] for d in bad] == ["HTTP 500: boom"] and bad[0]["prompt"] == "bad", sh
        assert [d["production_error"] for d in sh["disagreements"] if d["production_error"]] == ["HTTP 503"]
        assert b.live(stats[1], 0.0)["shadow"] == doc["shadow"], "either container reads every pair"
        assert a.live(stats[0], now[0] + 1)["shadow"]["cand"]["mirrored"] == 0, "since"

        pair = Pair(now[0], "p", "prod", "cand", "x", "x", 0.1, 0.1)
        local = Shadow(None, 1.0)
        local.pending += 1  # as `mirror` counts it
        local._add(pair)
        assert set(local.window()["cand"]) == set(sh), "the local server's shape"

        now[0] += 10  # container b is gone (its heartbeat is old): its running request is not waited for
        assert a.live(stats[0], 0.0)["shadow_pending"] == 0
        await b.close()
        assert b.pending == 0

    asyncio.run(scenario())


def test_answers_text_from_json_and_from_server_sent_events() -> None:
    assert answer_text({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}) == "hi"
    assert answer_text({"choices": [{"text": "ok"}]}) == "ok" and answer_text({"error": {}}) is None
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in ("he", "llo")]
    raw = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    assert streamed_text(raw.encode()) == "hello"
    assert streamed_text(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n') == "a"
