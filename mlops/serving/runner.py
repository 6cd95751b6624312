"""Run the local server: in a thread on a free port (for `mlops run` and tests) or in the foreground."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mlops.config import Loaded
from mlops.errors import InfraError, UsageError
from mlops.registry.releases import Registry
from mlops.serving.pool import ReleasePool
from mlops.serving.server import ServerOptions, api_key_from_env, create_app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build(loaded: Loaded, registry: Registry, threads: int | None = None) -> tuple[ReleasePool, ServerOptions]:
    quiet_transformers()
    d = loaded.cfg.deploy
    model = loaded.cfg.models[d.model]
    pool = ReleasePool(registry, max_batch_size=d.server.max_batch_size, max_queue=d.server.max_queue, threads=threads)
    opts = ServerOptions(
        model_name=d.model,
        prompt_template=model.prompt,
        request_timeout=d.server.request_timeout,
        api_key=api_key_from_env(d.server.api_key_env),
        default_max_tokens=model.max_tokens,
        shadow_log=str(loaded.root / ".mlops-shadow.jsonl") if d.rollout.shadow > 0 else None,
    )
    return pool, opts


def check_bind(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise UsageError(
            f"refusing to bind {host} without an API key: set deploy.server.api_key_env and that variable"
        )


@contextlib.contextmanager
def serve_in_thread(loaded: Loaded, registry: Registry, host: str = "127.0.0.1", port: int = 0, threads: int | None = None) -> Iterator[str]:
    """Start the server on `host:port` (0 = a free port) and yield its base URL; stop it on exit."""
    import uvicorn

    pool, opts = build(loaded, registry, threads)
    check_bind(host, opts.api_key)
    pool.start()
    app = create_app(pool, opts)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        pool.close()
        raise InfraError(f"cannot bind {host}:{port}: {e.strerror}") from e
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    t.start()
    deadline = time.monotonic() + 30  # generous: a loaded 2-core CI machine
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            pool.close()
            raise InfraError("local server did not start within 30 s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(timeout=15)
        pool.close()
        sock.close()


def serve_foreground(loaded: Loaded, registry: Registry, host: str, port: int) -> None:
    import uvicorn

    pool, opts = build(loaded, registry)
    check_bind(host, opts.api_key)
    pool.start()
    try:
        uvicorn.run(create_app(pool, opts), host=host, port=port, log_level="info", lifespan="off", timeout_graceful_shutdown=10)
    finally:
        pool.close()


def shadow_log_path(loaded: Loaded) -> Path:
    return loaded.root / ".mlops-shadow.jsonl"
