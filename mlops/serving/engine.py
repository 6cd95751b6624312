"""A continuous-batching generation engine for one release, on CPU (the local backend's engine).

One worker thread per engine runs a loop of decode steps over the requests in its running batch.
Between two steps it admits whatever has arrived (up to `max_batch_size`): the newcomers' prompts
go through one prefill forward pass together, their key/value caches are left-padded to the
running batch's length and joined to it, and from the next step on they decode with everyone else.
Finished requests leave the batch at once. So a request never waits for another batch to finish,
which is what keeps the tail latency flat under load (see benchmarks/bench_serving.py).

Each new token is pushed to its request's `sink` as soon as it is decoded (streaming costs
nothing extra); a caller that only wants the whole text passes `on_done` instead and gets one
call when the request finishes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.errors import InfraError
from mlops.serving import kvcache
from mlops.serving.genrequest import BadRequest, EngineClosed, GenRequest, Overloaded, check_params

__all__ = ["BadRequest", "Engine", "EngineClosed", "GenRequest", "Overloaded"]

# transformers' from_pretrained is not thread-safe: its meta-device initialisation is process-wide,
# and two loads at once (the watcher preloading while a rollback preflight or a pinned request
# loads) can leave parameters on the meta device, or worse, silently uninitialised. Loads are rare.
_LOAD_LOCK = threading.Lock()


@dataclass(eq=False)
class _Seq:
    """A request in the running batch."""

    req: GenRequest
    budget: int  # tokens it may still generate (max_tokens, capped by the position table)
    pos: int  # position id of its next input token
    last: int = 0  # its next input token
    generator: Any = None  # torch.Generator for temperature sampling with a seed


class Engine:
    """Loads a saved Hugging Face causal LM and serves generation requests in one running batch."""

    def __init__(
        self,
        model_dir: str | Path,
        max_batch_size: int = 32,
        max_queue: int = 256,
        threads: int | None = None,
        start: bool = True,
    ) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        try:
            with _LOAD_LOCK:
                self.tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
                self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        except Exception as e:  # a corrupt or partial artifact must not take the server down
            raise InfraError(f"cannot load model from {self.model_dir}: {type(e).__name__}: {e}") from e
        self.model.eval()
        gen_path = self.model_dir / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        cfg = self.model.config
        self.eos_id = int(gen.get("eos_token_id") or cfg.eos_token_id or 0)
        pad = gen.get("pad_token_id")
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.max_positions = int(getattr(cfg, "n_positions", 0) or cfg.max_position_embeddings)
        # An upper bound on the text one token stands for (a vocabulary entry is never shorter than
        # what it decodes to): a prompt longer than context * this many characters cannot fit, and
        # is refused without tokenizing it (tokenizing a 1 MB prompt took seconds, holding the GIL).
        self.max_token_chars = max([1, *map(len, self.tok.get_vocab(with_added_tokens=True))])
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._running = 0
        self._piece_cache: dict[int, str] = {}
        # counters for /metrics and the benchmark
        self.steps = 0
        self.step_rows = 0  # sum of batch sizes over decode steps
        self.prefills = 0
        self.requests_done = 0
        self._worker = threading.Thread(target=self._run, name=f"engine-{self.model_dir.name}", daemon=True)
        if start:
            self._worker.start()

    # ------------------------------------------------------------------ public

    def check(self, req: GenRequest) -> None:
        """Raise BadRequest unless `req` can be served alone; tokenizes its prompt once. Anything
        that could fail inside a batch is checked here, so one request never fails its batch."""
        check_params(req, self.max_positions)
        room = self.max_positions - 1  # at least one position is left to generate into
        if len(req.prompt) > room * self.max_token_chars:
            raise BadRequest(f"prompt is longer than the model's context ({self.max_positions} tokens)", "prompt")
        try:
            ids = self.tok.encode(req.prompt, add_special_tokens=False).ids
        except Exception as e:
            raise BadRequest(f"prompt cannot be tokenized: {type(e).__name__}", "prompt") from None
        if len(ids) > room:
            raise BadRequest(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_positions} (at most {room} "
                "for the prompt)",
                "prompt",
            )
        req.prompt_ids = ids

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue `req`; raise BadRequest when it cannot be served (see `check`), Overloaded when the
        queue is full, EngineClosed when draining."""
        if req.sink is None and req.on_done is None:
            req.sink = req.tokens.put
        if self._stop.is_set():
            raise EngineClosed("engine is draining")
        if req.prompt_ids is None:
            self.check(req)
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
            try:
                if left <= 0:
                    raise queue.Empty
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

    @property
    def busy(self) -> int:
        """Requests queued or in the running batch."""
        return self._queue.qsize() + self._running

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def stop_accepting(self) -> None:
        """From now on `submit` raises EngineClosed; what is queued or running still finishes."""
        self._stop.set()

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests; let queued and running ones finish (bounded), then stop the worker."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout=drain_timeout)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        running: list[_Seq] = []
        cache: Any = None  # a transformers DynamicCache: per layer [batch, heads, length, dim]
        mask: Any = None  # [batch, length] 1 where the cache holds a real token
        while True:
            new = self._admit(block=not running)
            if new is None:  # stopped and drained
                return
            self._running = len(running) + len(new)
            try:
                if new:
                    joined, c2, m2 = self._prefill(new)
                    running, cache, mask = kvcache.join(running, cache, mask, joined, c2, m2)
                if running:
                    running, cache, mask = self._decode(running, cache, mask)
            except Exception as e:  # report to every waiter, keep the worker alive
                for s in running + [_Seq(r, 0, 0) for r in new if not r.finished]:
                    s.req.error = f"generation failed: {type(e).__name__}: {e}"
                    self._finish(s.req, "error")
                running, cache, mask = [], None, None
            self._running = len(running)

    def _admit(self, block: bool) -> list[GenRequest] | None:
        room = self.max_batch_size - self._running
        out: list[GenRequest] = []
        if block:
            while True:
                try:
                    out.append(self._queue.get(timeout=0.05))
                    break
                except queue.Empty:
                    if self._stop.is_set():
                        return None
        while len(out) < room:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        live = []
        for r in out:
            if r.cancelled:
                self._finish(r, "cancelled")
            else:
                live.append(r)
        return live

    def _piece(self, t: int) -> str:
        p = self._piece_cache.get(t)
        if p is None:
            p = self._piece_cache[t] = self.tok.decode([t])
        return p

    def _finish(self, r: GenRequest, reason: str) -> None:
        if r.finished:
            return
        r.finished = True
        if reason not in ("cancelled", "error"):
            r.finish_reason = reason
        self.requests_done += 1
        try:  # a waiter's callback that fails (its event loop closed) concerns that request alone
            if r.sink is not None:
                r.sink(None)
            if r.on_done is not None:
                r.on_done(r)
        except Exception:
            r.cancelled = True

    def _fail(self, r: GenRequest, e: BaseException) -> None:
        """Fail one request (the rest of its batch carries on)."""
        r.error = f"generation failed: {type(e).__name__}: {e}"
        self._finish(r, "error")

    def _deliver(self, r: GenRequest, piece: str) -> None:
        if r.sink is not None:
            try:
                r.sink(piece)
            except Exception:  # the reader is gone: the request leaves the batch at its next token
                r.cancelled = True

    def _emit(self, s: _Seq, t: int) -> bool:
        """Deliver token `t` to its request; True when the request is finished."""
        r = s.req
        if r.finished:  # failed while sampling
            return True
        if r.cancelled:
            self._finish(r, "cancelled")
            return True
        if t == self.eos_id:
            self._finish(r, "stop")
            return True
        piece = self._piece(t)
        r.completion_tokens += 1
        before = len(r.text)
        r.text += piece
        if r.stop:
            hit = min(
                (i for i in (r.text.find(x, max(0, before - len(x) + 1)) for x in r.stop if x) if i >= 0), default=-1
            )
            if hit >= 0:
                r.text = r.text[:hit]
                if len(r.text) > before:
                    self._deliver(r, r.text[before:])
                self._finish(r, "stop")
                return True
        self._deliver(r, piece)
        s.budget -= 1
        s.last = t
        if s.budget <= 0:
            self._finish(r, "length")
            return True
        return False

    def _sample(self, logits: Any, seqs: list[_Seq]) -> list[int]:
        import torch

        nxt = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if s.req.temperature > 0:
                try:
                    # in float64 (1e-300 is 0 in float32) and shifted by the max: with a tiny
                    # temperature the top logit is 0 and the rest -inf, so softmax stays finite
                    row = logits[i].double() - logits[i].max()
                    probs = torch.softmax(row / s.req.temperature, -1)
                    nxt[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
                except Exception as e:  # this request fails; the others keep their tokens
                    self._fail(s.req, e)
        return [int(t) for t in nxt.tolist()]

    def _prefill(self, reqs: list[GenRequest]) -> tuple[list[_Seq], Any, Any]:
        """One forward pass over the newcomers' prompts (left-padded); emits their first token."""
        import torch

        self.prefills += 1
        seqs, encoded = [], []
        for r in reqs:
            try:  # per request: what fails here fails that request only
                if r.prompt_ids is None:  # queued without `submit`
                    self.check(r)
                ids = list(r.prompt_ids or ())
                gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            except Exception as err:
                self._fail(r, err)
                continue
            r.prompt_tokens = len(ids)
            encoded.append(ids or [self.eos_id])  # an empty prompt starts from the end-of-text token
            seqs.append(_Seq(r, min(r.max_tokens, self.max_positions - len(encoded[-1])), len(encoded[-1]), 0, gen))
        if not seqs:
            return [], None, None
        reqs = [s.req for s in seqs]
        width = max(len(e) for e in encoded)
        ids_t = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids_t[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids_t, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        toks = self._sample(out.logits[:, -1, :], seqs)
        keep = [i for i, (s, t) in enumerate(zip(seqs, toks, strict=True)) if s.budget > 0 and not self._emit(s, t)]
        for s in seqs:
            if s.budget <= 0 and not s.req.finished:
                self._finish(s.req, "length")
        return kvcache.select([seqs[i] for i in keep], keep, len(seqs), cache, mask)

    def _decode(self, seqs: list[_Seq], cache: Any, mask: Any) -> tuple[list[_Seq], Any, Any]:
        """One token for every running request (the model appends to `cache` in place)."""
        import torch

        self.steps += 1
        self.step_rows += len(seqs)
        ids = torch.tensor([[s.last] for s in seqs], dtype=torch.long)
        pos = torch.tensor([[s.pos] for s in seqs], dtype=torch.long)
        mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
        toks = self._sample(out.logits[:, -1, :], seqs)
        keep = []
        for i, (s, t) in enumerate(zip(seqs, toks, strict=True)):
            s.pos += 1
            if not self._emit(s, t):
                keep.append(i)
        return kvcache.select([seqs[i] for i in keep], keep, len(seqs), out.past_key_values, mask)
