"""`mlops serve` as a user runs it, for tests and benchmarks (as `typer.testing` ships a runner).

The real CLI in its own process on a free 127.0.0.1 port; the context manager yields its URL once
it answers, and stops it with SIGTERM (as a supervisor does) on exit, so whatever it buffered
(traffic capture) is flushed. A server that does not stop is killed, and that is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlops.util import free_port

STARTUP_S = 120.0  # a cold start on a loaded 2-core machine (torch import + model load) took ~20 s
STOP_S = 60.0  # draining requests and flushing capture at SIGTERM


class ServeFailed(RuntimeError):
    """`mlops serve` exited, or did not answer in time."""


@contextlib.contextmanager
def mlops_serve(
    root: Path, *args: str, loaded: bool = False, startup_s: float = STARTUP_S, log: Path | None = None
) -> Iterator[str]:
    """Run `mlops serve --port PORT ARGS...` in `root`; yield `http://127.0.0.1:PORT` once /health
    answers 200 (and, with `loaded`, reports a model loaded). `log`: its stderr goes there."""
    import httpx

    port = free_port()
    err = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port), *args],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
        env=os.environ | {"MLOPS_WANDB": "disabled"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise ServeFailed(f"mlops serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200 and (not loaded or r.json().get("loaded")):
                    break
            if time.monotonic() > deadline:
                raise ServeFailed(f"mlops serve did not come up in {startup_s:.0f} s")
            time.sleep(0.1)  # polling a process that is importing torch; bounded by `deadline`
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise ServeFailed(f"mlops serve did not stop within {STOP_S:.0f} s of SIGTERM") from None
        finally:
            if log is not None and not isinstance(err, int):
                err.close()


# A chat task small enough to learn in seconds: the assistant answers with the user's words in
# reverse order (the example's reversal, at the word level), with or without a system prompt, over
# one or two turns. Varied greedy answers that end with the end-of-turn token: what parity needs.
CHAT_WORDS = ("apple", "billing", "refund", "invoice", "order", "ship", "late", "card", "account", "reset", "help")
CHAT_SYSTEM = "Answer with the words in reverse order."
CHAT_TOOL = {  # a tool schema the chat tests send (its JSON is in the tokenizer's training text)
    "type": "function",
    "function": {
        "name": "refund",
        "description": "Refund an order.",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
    },
}


def chat_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` conversations of the chat task (OpenAI messages, the last turn the assistant's)."""
    import random

    rng = random.Random(seed)

    def turn() -> list[dict[str, str]]:
        q = " ".join(rng.choice(CHAT_WORDS) for _ in range(rng.randint(1, 4)))
        return [{"role": "user", "content": q}, {"role": "assistant", "content": " ".join(reversed(q.split()))}]

    out = []
    for i in range(n):
        conv = [{"role": "system", "content": CHAT_SYSTEM}] if i % 2 else []
        out.append(conv + (turn() + turn() if i % 3 == 0 else turn()))
    return out


def chat_artifact(dest: Path, arch: str = "llama", steps: int = 150, seed: int = 0) -> Path:
    """A fine-tuned chat model directory at `dest`, made by this project's training: an offline
    Llama-family base (head_dim 32, a BPE tokenizer, a ChatML template whose end-of-turn token is an
    eos id) fine-tuned `steps` steps on the chat task (loss on assistant tokens). Deterministic."""
    from mlops.training.offline_base import build_base
    from mlops.training.train import TrainJob, train_model

    work = dest.parent / f"{dest.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    convs = chat_conversations(96, seed)
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    texts = [m["content"] for c in convs for m in c] + [json.dumps(CHAT_TOOL)] * 8
    base = build_base(work / "base", texts, arch=arch, vocab_size=512, num_layers=2, num_heads=2, num_kv_heads=1,
                      max_position_embeddings=256, seed=seed)  # fmt: skip
    job = TrainJob(model_name="chat", dataset_path=str(data), out_dir=str(dest), base=str(base), steps=steps,
                   batch_size=16, lr=5e-3, warmup_steps=4, seed=seed, threads=1)  # fmt: skip
    return Path(train_model(job).out_dir)
