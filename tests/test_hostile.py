"""Hostile input against the real local server on 127.0.0.1: one bad request fails alone (never the
requests batched with it), every bound answers a 4xx with an OpenAI-style JSON body, and a key the
config asks for must exist before anything is served."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import conftest
import httpx
import pytest
from conftest import Hold, Trained, free_port, mlops, wait_for

from mlops.config import load
from mlops.errors import UsageError
from mlops.pipeline import Session
from mlops.serving.engine import Engine
from mlops.serving.runner import build
from mlops.serving.server import ServerOptions

WAIT_S = 30.0  # bound on every wait (a loaded 2-core machine)
NORMAL = {"model": "tiny", "prompt": "abc=", "max_tokens": 8}


@contextlib.contextmanager
def serving(trained: Trained, *sets: str) -> Iterator[tuple[str, Engine, ServerOptions]]:
    with conftest.serving(trained.root, sets) as s:
        engine = s.pool.engine(trained.release)
        assert engine is not None
        yield s.url, engine, s.opts


@pytest.fixture(scope="module")
def server(trained: Trained) -> Iterator[tuple[str, Engine, ServerOptions]]:
    # one batch holds every request of the isolation test
    with serving(trained, "deploy.server.max_batch_size=64") as s:
        yield s


def post(url: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str, Iterator)) else json.dumps(body)
    headers = {"content-type": "application/json"} | kw.pop("headers", {})
    return httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=WAIT_S, **kw)


def assert_client_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    return dict(err)


# --------------------------------------------------------------------------- item 1: isolation

HOSTILE = {
    "seed 1e30": ('{"prompt": "x=", "temperature": 1.0, "seed": 1e30, "max_tokens": 4}', 400),
    "seed 10**30": ('{"prompt": "x=", "temperature": 1.0, "seed": 1000000000000000000000000000000}', 400),
    "lone surrogate": ('{"prompt": "\\ud800=", "max_tokens": 4}', 400),
    "temperature 1e-300": ('{"prompt": "x=", "temperature": 1e-300, "max_tokens": 4}', 200),  # valid: near-greedy
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_one_bad_request_fails_alone_in_a_full_batch(server: tuple[str, Engine, ServerOptions], name: str) -> None:
    url, engine, _ = server
    body, status = HOSTILE[name]
    hold = Hold(engine)
    with ThreadPoolExecutor(max_workers=50) as pool:
        try:
            first = pool.submit(post, url, NORMAL)
            assert hold.entered.wait(WAIT_S), "the engine never started the first request"
            hostile = pool.submit(post, url, body)
            normals: list[Future[httpx.Response]] = [pool.submit(post, url, NORMAL) for _ in range(47)]
            # all 47 queued together with the hostile one (when it got past the server): one prefill
            wait_for(lambda: engine.queue_depth >= 47 + (0 if hostile.done() else 1), "the batch to queue")
        finally:
            hold.release()
        answers = [f.result(WAIT_S) for f in [first, *normals]]
        bad = hostile.result(WAIT_S)
    failed = [r.text[:200] for r in answers if r.status_code != 200]
    assert not failed, f"{len(failed)} of 48 normal requests failed: {failed[:2]}"
    if status == 200:
        assert bad.status_code == 200, bad.text
    else:
        assert_client_error(bad, status)


# --------------------------------------------------------------------------- item 2: bounds

BAD_BODIES = {
    "max_tokens 0": ({"prompt": "ab=", "max_tokens": 0}, "max_tokens"),
    "max_tokens true": ({"prompt": "ab=", "max_tokens": True}, "max_tokens"),
    "max_tokens 1.5": ({"prompt": "ab=", "max_tokens": 1.5}, "max_tokens"),
    "max_tokens beyond the context": ({"prompt": "ab=", "max_tokens": 10**9}, "max_tokens"),
    "max_tokens Infinity": ('{"prompt": "ab=", "max_tokens": Infinity}', None),
    "temperature NaN": ('{"prompt": "ab=", "temperature": NaN}', None),
    "temperature -1": ({"prompt": "ab=", "temperature": -1}, "temperature"),
    "temperature string": ({"prompt": "ab=", "temperature": "0.5"}, "temperature"),
    "prompt a number": ({"prompt": 7}, "prompt"),
    "prompt beyond the context": ({"prompt": "a" * 200}, "prompt"),
    "stop too many": ({"prompt": "ab=", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "stream a string": ({"prompt": "ab=", "stream": "yes"}, "stream"),
    "n 2": ({"prompt": "ab=", "n": 2}, "n"),
    "100k nested [": ("[" * 100_000, None),
    "not JSON": ("{'prompt': 1}", None),
    "not UTF-8": (b'{"prompt": "\xff"}', None),
    "an array": ("[1, 2]", None),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_fields_are_400_json_not_coerced(server: tuple[str, Engine, ServerOptions], name: str) -> None:
    body, param = BAD_BODIES[name]
    err = assert_client_error(post(server[0], body), 400)
    assert err["param"] == param


def test_body_over_the_limit_is_413_fast_without_reading_it(server: tuple[str, Engine, ServerOptions]) -> None:
    url, _, opts = server
    big = json.dumps({"prompt": "a" * 10_000_000})
    t0 = time.monotonic()
    err = assert_client_error(post(url, big), 413)
    assert str(opts.max_body_bytes) in err["message"]
    assert time.monotonic() - t0 < 5  # the 10 MB prompt took 55 s and +2.3 GB
    # a chunked body (no Content-Length) is cut off at the limit too
    chunks = (b'{"prompt": "' + b"a" * 65536 for _ in range(40))
    assert_client_error(post(url, chunks), 413)
    # a prompt under the body limit but far beyond the context is refused without tokenizing it
    t0 = time.monotonic()
    assert_client_error(post(url, {"prompt": "ab" * 400_000}), 400)
    assert time.monotonic() - t0 < 2
    assert post(url, NORMAL).status_code == 200


def test_oversized_header_is_431_json(server: tuple[str, Engine, ServerOptions]) -> None:
    url = server[0]
    r = httpx.get(f"{url}/health", headers={"x-big": "a" * 1_000_000}, timeout=WAIT_S)
    err = assert_client_error(r, 431)
    assert "head" in err["message"]
    # a malformed request line is a JSON 400 too (raw socket: no client would send it)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as s:
        s.sendall(b"GARBAGE \x00 HTTP/9\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, data = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(data)["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health", timeout=WAIT_S).status_code == 200


@pytest.mark.parametrize("model", ["x" * 10_000, "../../etc/passwd", "tiny-20990101-000000-abcdef", "a b", 42])
def test_unknown_model_is_404_json_that_echoes_no_path(
    server: tuple[str, Engine, ServerOptions], trained: Trained, model: Any
) -> None:
    r = post(server[0], {"prompt": "ab=", "model": model})
    err = assert_client_error(r, 404)
    assert err["code"] == "model_not_found" and len(err["message"]) < 200
    assert str(trained.root) not in r.text and ".mlops" not in r.text and "artifacts" not in r.text


def test_pinned_release_header_is_checked_like_a_model(server: tuple[str, Engine, ServerOptions]) -> None:
    r = post(server[0], NORMAL, headers={"x-mlops-release": "../state"})
    assert_client_error(r, 404)


# --------------------------------------------------------------------------- item 3: the key


@pytest.mark.parametrize("value", [None, "", "  "])
def test_key_named_but_missing_refuses_to_start(trained: Trained, value: str | None) -> None:
    env = {} if value is None else {"MLOPS_TEST_HOSTILE_KEY": value}
    r = mlops(
        "serve",
        "--port",
        "0",
        "--set",
        "deploy.server.api_key_env=MLOPS_TEST_HOSTILE_KEY",
        cwd=trained.root,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "MLOPS_TEST_HOSTILE_KEY" in r.stderr
    assert ("empty" if value is not None else "not set") in r.stderr
    loaded = load(trained.root / "mlops.yaml", ["deploy.server.api_key_env=MLOPS_TEST_HOSTILE_KEY"])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLOPS_TEST_HOSTILE_KEY", raising=False)
        with pytest.raises(UsageError, match="MLOPS_TEST_HOSTILE_KEY"):
            build(loaded, Session.open(loaded).registry)  # `mlops run`'s own server: the same refusal


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmHWM:"):  # the high-water mark: a spike counts even if freed since
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def test_ten_megabyte_prompts_leave_mlops_serve_memory_flat(trained: Trained) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port)],
        cwd=trained.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"MLOPS_WANDB": "disabled"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # a process start imports torch and loads the model: minutes on a loaded 2-core machine
        wait_for(lambda: proc.poll() is None and _loaded(url), "mlops serve to load its release", 180)
        assert post(url, NORMAL).status_code == 200
        before = _peak_rss_mb(proc.pid)
        big = json.dumps({"prompt": "a" * 10_000_000})
        t0 = time.monotonic()
        for _ in range(3):
            assert_client_error(post(url, big), 413)
        assert time.monotonic() - t0 < 10  # the one took 55 s
        grown = _peak_rss_mb(proc.pid) - before
        assert grown < 30, f"peak RSS grew {grown:.0f} MB"  # it was +2.3 GB
        assert post(url, NORMAL).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT_S)


def _loaded(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/health", timeout=2).json().get("loaded"))
    except httpx.HTTPError:
        return False
