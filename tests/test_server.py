"""The local OpenAI-compatible endpoint, for real: the official `openai` client, load shedding,
timeouts, auth, metrics, following `mlops rollback` from another process, and draining.

Servers run in this process (uvicorn in a thread on a free port) so a test can hold an engine's
worker at its next forward pass: that is how "requests in flight" and "a full queue" are made
deterministic here, with no sleeps. Every server a test starts is stopped by it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import conftest
import httpx
import openai
import pytest
from conftest import Hold, Served, make_project, mlops, train_and_publish, wait_for

from mlops.config import load
from mlops.errors import UsageError
from mlops.pipeline import Session
from mlops.registry.releases import Registry, State
from mlops.serving.base import Engine
from mlops.serving.runner import check_bind

H = "x-mlops-release"
WAIT_S = 20.0  # bound on every wait for a condition (a loaded 2-core machine)


@dataclass
class Proj:
    root: Path
    a: str  # previous production
    b: str  # production

    def registry(self) -> Registry:
        return Session.open(load(self.root / "mlops.yaml")).registry

    def reset(self) -> State:
        """production b, previous a, all traffic on b (what every test starts from)."""

        def change(st: State) -> State:
            st.stages = {"production": self.b, "previous": self.a, "candidate": None, "canary": None}
            st.routing, st.shadow = {self.b: 100}, {}
            return st

        return self.registry().update_state(change, reason="test reset", actor="test")


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Proj:
    root = make_project(tmp_path_factory.mktemp("serve"))
    a = train_and_publish(root, seed=0)
    b = train_and_publish(root, seed=1)  # production b, previous a
    return Proj(root, a, b)


@contextlib.contextmanager
def serving(proj: Proj, sets: tuple[str, ...] = (), retain: float | None = None) -> Iterator[Served]:
    proj.reset()
    with conftest.serving(proj.root, sets, retain=retain) as s:
        yield s


@pytest.fixture(scope="module")
def server(proj: Proj) -> Iterator[Served]:
    with serving(proj) as s:
        yield s


def in_background(fn: Callable[[], httpx.Response]) -> Callable[[], httpx.Response]:
    """Run `fn` in a thread; the returned callable joins it (bounded) and gives its response."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(_capture(fn)), daemon=True)
    t.start()

    def result() -> httpx.Response:
        t.join(WAIT_S)
        assert out, "request did not finish"
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]  # type: ignore[no-any-return]

    return result


def _capture(fn: Callable[[], httpx.Response]) -> Any:
    try:
        return fn()
    except BaseException as e:  # re-raised in the test thread
        return e


# --------------------------------------------------------------------------- the openai client


def test_openai_client_works_unchanged(server: Served, proj: Proj) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    raw = client.models.with_raw_response.list()
    assert raw.headers[H] == proj.b
    ids = [m.id for m in raw.parse().data]
    assert ids[0] == "tiny" and {proj.a, proj.b} <= set(ids)

    raw_c = client.completions.with_raw_response.create(model="tiny", prompt="abcd=", max_tokens=8)
    comp = raw_c.parse()
    assert raw_c.headers[H] == proj.b and comp.system_fingerprint == proj.b
    assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage and comp.usage.prompt_tokens == 5

    msgs: Any = [{"role": "system", "content": "reverse"}, {"role": "user", "content": "abcd"}]
    raw_chat = client.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=8)
    chat = raw_chat.parse()
    text = chat.choices[0].message.content
    assert raw_chat.headers[H] == proj.b and chat.choices[0].message.role == "assistant"
    assert text == comp.choices[0].text, "chat wraps the user turn in the model's prompt template"

    raw_stream = client.chat.completions.with_raw_response.create(
        model="tiny", messages=msgs, max_tokens=8, stream=True
    )
    assert raw_stream.headers[H] == proj.b
    chunks = list(raw_stream.parse())
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text

    pinned = client.completions.with_raw_response.create(model=proj.a, prompt="abcd=", max_tokens=8)
    assert pinned.headers[H] == proj.a, "a release id as the model pins that release"

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.status_code == 404 and e.value.response.headers[H]


def test_every_response_names_a_release(server: Served, proj: Proj) -> None:
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/mlops/stats"), ("GET", "/nope")]:
        r = httpx.request(method, f"{server.url}{path}", timeout=WAIT_S)
        assert r.headers.get(H) == proj.b, (path, r.status_code)
    bad = httpx.post(f"{server.url}/v1/completions", content=b"not json", timeout=WAIT_S)
    assert bad.status_code == 400 and H in bad.headers
    pin = server.post(headers={H: "tiny-nope"})
    assert pin.status_code == 404 and pin.json()["error"]["code"] == "model_not_found" and H in pin.headers
    assert server.post(headers={H: proj.a}).headers[H] == proj.a


def test_metrics_are_prometheus_text_with_per_release_counters(server: Served, proj: Proj) -> None:
    before = _counter(httpx.get(f"{server.url}/metrics", timeout=WAIT_S).text, proj.a)
    for _ in range(3):
        assert server.post(headers={H: proj.a}).status_code == 200
    r = httpx.get(f"{server.url}/metrics", timeout=WAIT_S)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$')
    for line in r.text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert _counter(r.text, proj.a) == before + 3
    assert f'mlops_release_loaded{{release="{proj.b}"}} 1' in r.text  # 1 or 1.0
    assert 'mlops_model_loads_total{source="request"} 0' in r.text


def _ok_counts(text: str) -> dict[str, int]:
    """`mlops_requests_total{outcome="ok"}` by release, read with Prometheus' own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.labels["release"]: int(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "mlops_requests_total" and s.labels.get("outcome") == "ok"
    }


def _counter(text: str, release: str) -> int:
    return _ok_counts(text).get(release, 0)


# --------------------------------------------------------------------------- load shedding


@contextlib.contextmanager
def held(s: Served, release: str) -> Iterator[tuple[Engine, Hold]]:
    """`release`'s engine in `s`, its worker held at the next prefill until the block exits."""
    engine = s.pool.engine(release)
    assert engine is not None
    hold = Hold(engine)
    try:
        yield engine, hold
    finally:
        hold.release()


def test_full_queue_answers_503_with_retry_after(proj: Proj) -> None:
    with serving(proj, ("deploy.server.max_queue=2",)) as s:
        with held(s, proj.b) as (engine, hold):
            first = in_background(lambda: s.post({"user": "u0"}))
            assert hold.entered.wait(WAIT_S)  # the worker took it and is held in its forward pass
            queued = [in_background(lambda i=i: s.post({"user": f"u{i}"})) for i in (1, 2)]
            wait_for(lambda: engine.queue_depth == 2, "two queued requests")
            shed = s.post({"user": "u3"})
            assert shed.status_code == 503 and shed.headers["retry-after"] == "1" and shed.headers[H] == proj.b
            stream = s.post({"user": "u4", "stream": True})
            assert stream.status_code == 503, "a stream is refused before its 200, not inside it"
        assert [r().status_code for r in (first, *queued)] == [200, 200, 200]
        assert s.post().status_code == 200


def test_request_timeout_answers_504_and_frees_the_slot(proj: Proj) -> None:
    with serving(proj, ("deploy.server.request_timeout=0.3",)) as s:
        with held(s, proj.b) as (engine, _):
            t0 = time.perf_counter()
            r = s.post()
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and r.headers[H] == proj.b
            assert time.perf_counter() - t0 < 5
        wait_for(lambda: engine.busy == 0, "the timed-out request to leave the engine")
        assert s.post().status_code == 200


# --------------------------------------------------------------------------- security


def test_bearer_key_required_when_configured(proj: Proj, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_TEST_SERVE_KEY", "k-7f3a9")
    with serving(proj, ("deploy.server.api_key_env=MLOPS_TEST_SERVE_KEY",)) as s:
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="k-7f3a9", max_retries=0)
        assert good.completions.create(model="tiny", prompt="ab=", max_tokens=4).system_fingerprint == proj.b
        bad = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ab"}])
        assert s.post().status_code == 401
        assert httpx.get(f"{s.url}/metrics", timeout=WAIT_S).status_code == 401
        assert httpx.get(f"{s.url}/health", timeout=WAIT_S).status_code == 200  # liveness stays open
        metrics = httpx.get(f"{s.url}/metrics", headers={"authorization": "Bearer k-7f3a9"}).text
        assert 1 in _ok_counts(metrics).values()


def test_binding_beyond_loopback_needs_a_key(proj: Proj) -> None:
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-key")
    with pytest.raises(UsageError, match="without an API key"):
        check_bind("0.0.0.0", None)
    r = mlops("serve", "--host", "0.0.0.0", "--port", "0", cwd=proj.root, timeout=120)
    assert r.returncode == 1 and "refusing to bind 0.0.0.0" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- rollback and drain


def served_by(s: Served, n: int = 12) -> set[str]:
    out = set()
    for i in range(n):
        r = s.post({"user": f"user-{i}"})
        assert r.status_code == 200, r.text
        out.add(r.headers[H])
    return out


def test_running_server_follows_rollback_from_another_process_without_loading(server: Served, proj: Proj) -> None:
    assert served_by(server) == {proj.b}
    loads = dict(server.pool.loads)
    r = mlops("rollback", "--to", proj.a, "--json", cwd=proj.root, timeout=120)
    assert r.returncode == 0, r.stderr
    # no wait: the very next request sees the new state (one stat per request), and the
    # target was preloaded as `previous`, so nothing is loaded on the request path
    assert served_by(server) == {proj.a}
    assert dict(server.pool.loads) == loads and server.pool.loads["request"] == 0
    assert json.loads(r.stdout)["production"] == proj.a
    proj.reset()  # back to b, by the same kind of state write
    assert served_by(server) == {proj.b}


def test_release_that_left_the_routing_stays_loaded_for_the_bake_then_unloads(proj: Proj) -> None:
    from mlops.rollout import promote, rollback

    c = train_and_publish(proj.root, seed=2, steps=5, promote=False)
    with serving(proj) as s:  # retention: the rollout's bake, 10 minutes by default
        backend = Session.open(load(proj.root / "mlops.yaml")).backend
        assert set(s.pool.loaded()) >= {proj.a, proj.b}
        promote(backend, c, reason="test")  # production c, previous b: a leaves the state
        wait_for(lambda: s.post().headers[H] == c, "the flip to c")
        assert served_by(s, 4) == {c}
        assert proj.a in s.pool.loaded(), "kept for the bake period"
        s.pool.retain = 0.0  # the bake period ends
        wait_for(lambda: proj.a not in s.pool.loaded(), "a to unload after the bake period")
        loads = dict(s.pool.loads)
        # rolling back to a release that is no longer loaded: the server keeps answering from c
        # until the watcher has loaded a, then flips; no request waits for the load
        rollback(backend, proj.a, reason="test", actor="test")
        wait_for(lambda: s.post().headers[H] == proj.a, "the flip to a")
        assert served_by(s, 4) == {proj.a}
        assert s.pool.loads["request"] == 0 and s.pool.loads["preload"] == loads["preload"] + 1
    proj.reset()


def test_requests_in_flight_during_a_rollback_finish_on_the_release_that_took_them(proj: Proj) -> None:
    from mlops.rollout import rollback

    with serving(proj, retain=0.0) as s:  # the hard case: b's engine is closed as soon as it leaves
        expected = {i: s.post({"prompt": f"{'abcde'[: i + 2]}=", "user": f"u{i}"}).json() for i in range(3)}
        with held(s, proj.b) as (engine, hold):
            first = in_background(lambda: s.post({"prompt": "ab=", "user": "u0"}))
            assert hold.entered.wait(WAIT_S)
            rest = [
                in_background(lambda i=i: s.post({"prompt": f"{'abcde'[: i + 2]}=", "user": f"u{i}"})) for i in (1, 2)
            ]
            wait_for(lambda: engine.queue_depth == 2, "two queued requests")
            backend = Session.open(load(proj.root / "mlops.yaml")).backend
            rollback(backend, proj.a, reason="rollback with requests in flight", actor="test")
            assert served_by(s, 3) == {proj.a}, "new requests go to a while b is still held"

            def forget(st: State) -> State:
                st.stages["previous"] = None  # b leaves the state: its engine drains and closes
                return st

            backend.set_state(forget, reason="test", actor="test")
            wait_for(lambda: engine.closed, "b to stop taking requests (drain)")
        done = [first(), *(r() for r in rest)]
        for i, r in enumerate(done):
            assert r.status_code == 200 and r.headers[H] == proj.b, "finished on the release that took it"
            assert r.json()["choices"][0]["text"] == expected[i]["choices"][0]["text"]
        wait_for(lambda: proj.b not in s.pool.loaded(), "b to unload once drained")
    proj.reset()


def test_shutdown_drains_requests_in_flight(proj: Proj) -> None:
    ctx = serving(proj)
    s = ctx.__enter__()
    engine = s.pool.engine(proj.b)
    assert engine is not None
    hold = Hold(engine)
    pending = in_background(lambda: s.post())
    try:
        assert hold.entered.wait(WAIT_S)
        stopper = threading.Thread(target=ctx.__exit__, args=(None, None, None), daemon=True)
        stopper.start()  # uvicorn stops accepting and waits for the request in flight
        wait_for(lambda: not _accepting(s.url), "the server to stop accepting")
    finally:
        hold.release()
    r = pending()
    assert r.status_code == 200 and r.headers[H] == proj.b
    stopper.join(WAIT_S)
    assert not stopper.is_alive() and engine.closed


def _accepting(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False
