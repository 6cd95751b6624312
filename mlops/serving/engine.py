"""A dynamic-batching generation engine for one release on CPU (or GPU when present).

Concurrent requests are gathered into one batch per forward pass: a worker thread takes every
request waiting in the queue (up to `max_batch_size`), left-pads them, and decodes greedily (or
with temperature) step by step with a KV cache, pushing each new token to its request as it comes,
so streaming costs nothing extra. New requests wait for the current batch to finish; for the short
completions of a small model that keeps the code simple and the throughput high (see benchmarks/).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops.errors import InfraError


class Overloaded(Exception):
    """The queue is full: the server answers 503 with Retry-After."""


@dataclass
class GenRequest:
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # filled by the engine: each text piece, then None when finished (sink is called from the
    # engine's thread; an asyncio caller passes one that hops onto its loop)
    tokens: queue.SimpleQueue[str | None] = field(default_factory=queue.SimpleQueue)
    sink: Callable[[str | None], None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    error: str | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)


class Engine:
    """Loads a saved Hugging Face causal LM and serves generation requests in batches."""

    def __init__(self, model_dir: str | Path, max_batch_size: int = 32, max_queue: int = 256, threads: int | None = None):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        if threads:
            torch.set_num_threads(threads)
        try:
            self.tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        except Exception as e:  # a corrupt or partial artifact must not take the server down
            raise InfraError(f"cannot load model from {self.model_dir}: {type(e).__name__}: {e}") from e
        self.model.eval()
        gen = json.loads((self.model_dir / "generation_config.json").read_text()) if (
            self.model_dir / "generation_config.json"
        ).exists() else {}
        self.eos_id = int(gen.get("eos_token_id") or self.model.config.eos_token_id or 0)
        self.pad_id = int(gen.get("pad_token_id") if gen.get("pad_token_id") is not None else self.eos_id)
        self.max_positions = int(getattr(self.model.config, "n_positions", 0) or self.model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.batches = 0
        self.batched_requests = 0
        self._worker = threading.Thread(target=self._run, name=f"engine-{self.model_dir.name}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public

    def submit(self, req: GenRequest) -> GenRequest:
        if req.sink is None:
            req.sink = req.tokens.put
        if self._stop.is_set():
            raise Overloaded("engine is shutting down")
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise Overloaded("queue full") from None
        return req

    def stream(self, req: GenRequest, timeout: float) -> Iterator[str]:
        """Yield text pieces of `req` as they are generated; raise TimeoutError past `timeout`."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                req.cancelled = True
                raise TimeoutError("generation timed out")
            try:
                piece = req.tokens.get(timeout=left)
            except queue.Empty:
                req.cancelled = True
                raise TimeoutError("generation timed out") from None
            if piece is None:
                if req.error:
                    raise InfraError(req.error)
                return
            yield piece

    def generate(self, req: GenRequest, timeout: float = 30.0) -> str:
        self.submit(req)
        return "".join(self.stream(req, timeout))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self, drain_timeout: float = 10.0) -> None:
        """Stop taking requests; let queued and running ones finish (bounded), then stop the worker."""
        self._stop.set()
        self._worker.join(timeout=drain_timeout)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            try:
                self._generate_batch(batch)
            except Exception as e:  # report to every waiter, keep the worker alive
                for r in batch:
                    r.error = f"generation failed: {type(e).__name__}: {e}"
                    self._emit(r, None)

    @staticmethod
    def _emit(r: GenRequest, piece: str | None) -> None:
        assert r.sink is not None
        r.sink(piece)

    def _generate_batch(self, batch: list[GenRequest]) -> None:
        import torch

        self.batches += 1
        self.batched_requests += len(batch)
        encoded = []
        for r in batch:
            ids = self.tok.encode(r.prompt, add_special_tokens=False).ids[-(self.max_positions - 1) :]
            r.prompt_tokens = len(ids)
            encoded.append(ids)
        width = max(len(e) for e in encoded)
        budget = [min(r.max_tokens, self.max_positions - len(e)) for r, e in zip(batch, encoded, strict=True)]
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            if e:
                ids[i, width - len(e) :] = torch.tensor(e)
                mask[i, width - len(e) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = [b <= 0 for b in budget]
        texts = ["" for _ in batch]
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in batch]
        for i, d in enumerate(done):
            if d:
                self._emit(batch[i], None)
        past = None
        step_ids, step_pos = ids, pos
        with torch.inference_mode():
            for step in range(max(budget, default=0)):
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :]
                nxt = logits.argmax(-1)
                for i, r in enumerate(batch):
                    if not done[i] and r.temperature > 0:
                        probs = torch.softmax(logits[i] / r.temperature, -1)
                        nxt[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
                for i, r in enumerate(batch):
                    if done[i]:
                        continue
                    if r.cancelled:
                        done[i] = True
                        continue
                    t = int(nxt[i])
                    if t == self.eos_id:
                        r.finish_reason = "stop"
                        done[i] = True
                        self._emit(r, None)
                        continue
                    piece = self.tok.decode([t])
                    r.completion_tokens += 1
                    texts[i] += piece
                    hit = next((s for s in r.stop if s and s in texts[i]), None)
                    if hit is not None:
                        keep = texts[i][: texts[i].index(hit)]
                        emitted = texts[i][: len(texts[i]) - len(piece)]
                        if len(keep) > len(emitted):
                            self._emit(r, keep[len(emitted) :])
                        r.finish_reason = "stop"
                        done[i] = True
                        self._emit(r, None)
                        continue
                    self._emit(r, piece)
                    if r.completion_tokens >= budget[i]:
                        r.finish_reason = "length"
                        done[i] = True
                        self._emit(r, None)
                if all(done):
                    break
                step_ids = nxt.unsqueeze(-1)
                mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
                step_pos = step_pos[:, -1:] + 1
        for i, r in enumerate(batch):
            if not done[i]:
                self._emit(r, None)
