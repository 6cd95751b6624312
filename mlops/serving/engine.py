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

LoRA adapter releases share one engine loaded with their base: `load_adapter` adds a peft adapter
at run time (the model becomes a `PeftModel` with the first), and each row of the batch runs with
its own request's adapter (peft's mixed-batch inference, `adapter_names=[...]` per row), so
requests for different adapters decode in the same steps (a batch of one adapter runs it as the
active adapter instead: no per-row hooks). Loading and deleting an adapter take the model lock
between two steps; nothing else waits.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.configvllm import VllmCfg
from mlops.errors import InfraError
from mlops.serving import kvcache, native
from mlops.serving.base import QueuedEngine
from mlops.serving.chat import stop_ids
from mlops.serving.genrequest import BadRequest, EngineClosed, GenRequest, Overloaded
from mlops.serving.hfimport import serving_imports

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
    # tokenizers' DecodeStream, primed with the prompt (as vLLM's detokenizer): a token's text can
    # depend on the ones before it (a space a Metaspace decoder drops at the start, a character
    # whose UTF-8 bytes span two byte-level tokens), so text comes from the stream, not per token
    stream: Any = None


class Engine(QueuedEngine):
    """Loads a saved Hugging Face causal LM and serves generation requests in one running batch."""

    def __init__(
        self,
        model_dir: str | Path,
        max_batch_size: int = 32,
        max_queue: int = 256,
        threads: int | None = None,
        start: bool = True,
        vllm: VllmCfg | None = None,  # deploy.vllm: max_model_len and max_num_seqs apply here
        use_native: bool = True,  # False: transformers' model even where the native forward pass runs
    ) -> None:
        import torch
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        try:
            self.tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            # GPT-2 and the Llama family run on the engine's own forward pass (no transformers
            # import: most of the start-up); anything else through transformers, and so does a
            # base that adapter releases are loaded into (peft adapts transformers' modules)
            self.model: Any = (native.load(self.model_dir) if use_native else None) or self._transformers_model()
        except Exception as e:  # a corrupt or partial artifact must not take the server down
            raise InfraError(f"cannot load model from {self.model_dir}: {type(e).__name__}: {e}") from e
        self.model.eval()
        gen_path = self.model_dir / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        cfg = self.model.config
        self.stop_ids = frozenset(ids := stop_ids(self.model_dir, self.tok, cfg.eos_token_id))
        self.eos_id = ids[0]
        pad = gen.get("pad_token_id")
        if pad is None:
            pad = getattr(cfg, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else self.eos_id
        context = int(getattr(cfg, "n_positions", 0) or cfg.max_position_embeddings)
        # A sliding-window layer keeps only its window in the cache and the batch surgery in
        # kvcache.py assumes every layer holds the whole row: serve at most the window.
        window = getattr(cfg, "sliding_window", None)
        if isinstance(window, int) and window > 0 and getattr(cfg, "use_sliding_window", True):
            context = min(context, window)
        self._open_front(self.tok, context, max_batch_size, max_queue)
        self.limit(vllm)
        self.adapters: dict[str, Path] = {}  # adapter name -> its directory (loaded into the model)
        self._model_lock = threading.Lock()  # a forward pass, or an adapter load/delete
        self._adapter_busy: Counter[str] = Counter()  # adapter -> requests queued or running
        self._busy_lock = threading.Lock()
        self.mixed_steps = 0  # forward passes whose batch ran more than one adapter (or one and the base)
        self._worker = threading.Thread(target=self._run, name=f"engine-{self.model_dir.name}", daemon=True)
        if start:
            self._worker.start()

    def _transformers_model(self) -> Any:
        import torch

        with _LOAD_LOCK, serving_imports():
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)

    # ------------------------------------------------------------------ public

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests; let queued and running ones finish (bounded), then stop the worker."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout=drain_timeout)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the peft adapter at `path` under `name`; requests tagged `name` run with it from now."""
        if name in self.adapters:
            return
        if isinstance(self.model, native.NativeLM):  # LoRA in the engine's own forward pass: no peft
            try:
                with self._model_lock:
                    self.model.load_adapter(path, adapter_name=name)
            except (OSError, ValueError, KeyError) as e:
                raise InfraError(
                    f"cannot load adapter {name} from {path}: {e} (MLOPS_NATIVE=0 serves it through peft)"
                ) from e
            self.adapters[name] = Path(path)
            return
        try:
            with _LOAD_LOCK, serving_imports(), self._model_lock:
                from peft import PeftModel

                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False, low_cpu_mem_usage=True)
                else:  # the first adapter wraps the base model (its modules gain LoRA layers)
                    self.model = PeftModel.from_pretrained(
                        self.model, str(path), adapter_name=name, low_cpu_mem_usage=True
                    )
                self.model.eval()
        except Exception as e:
            raise InfraError(f"cannot load adapter {name} from {path}: {type(e).__name__}: {e}") from e
        self.adapters[name] = Path(path)

    def unload_adapter(self, name: str) -> None:
        """Delete adapter `name` from the model (its requests must be finished: see `adapter_busy`)."""
        if self.adapters.pop(name, None) is None:
            return
        with self._model_lock, warnings.catch_warnings():
            # peft names a new "active" adapter when the active one goes: every forward here names
            # each row's adapter, so which one is active does not matter
            warnings.simplefilter("ignore", UserWarning)
            self.model.delete_adapter(name)

    def adapter_busy(self, name: str) -> int:
        """Requests for adapter `name` queued or being generated."""
        return self._adapter_busy.get(name, 0)

    def submit(self, req: GenRequest) -> GenRequest:
        if req.adapter is None:
            return super().submit(req)
        if req.adapter not in self.adapters:
            raise EngineClosed(f"adapter {req.adapter} is not loaded")
        with self._busy_lock:  # counted before it is queued: the worker may finish it at once
            self._adapter_busy[req.adapter] += 1
        try:
            return super().submit(req)
        except BaseException:
            self._done_with(req.adapter)
            raise

    def _done_with(self, adapter: str) -> None:
        with self._busy_lock:
            self._adapter_busy[adapter] -= 1
            if self._adapter_busy[adapter] <= 0:
                del self._adapter_busy[adapter]

    def _finish(self, r: GenRequest, reason: str) -> None:
        counted = r.adapter is not None and not r.finished
        super()._finish(r, reason)
        if counted and r.adapter is not None:
            self._done_with(r.adapter)

    def wait_adapter_idle(self, name: str, timeout: float) -> bool:
        """Wait (bounded) until no request for adapter `name` is queued or running."""
        deadline = time.monotonic() + timeout
        while self.adapter_busy(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _forward(self, seqs: list[_Seq], **kw: Any) -> Any:
        """The model on one batch; with adapters loaded, each row with its request's adapter."""
        with self._model_lock:
            if self.adapters:
                names = []
                for s in seqs:
                    if s.req.adapter is not None and s.req.adapter not in self.adapters and not s.req.finished:
                        # unloaded under it (its drain timed out): this request fails, never answers from the base
                        self._fail(s.req, EngineClosed(f"adapter {s.req.adapter} was unloaded"))
                    names.append(s.req.adapter if s.req.adapter in self.adapters else "__base__")
                if isinstance(self.model, native.NativeLM):  # applies each row's adapter itself
                    kw["adapter_names"] = names
                    self.mixed_steps += len(set(names)) > 1
                elif len(set(names)) > 1 or names[0] == "__base__":
                    kw["adapter_names"] = names
                    self.mixed_steps += len(set(names)) > 1
                elif self.model.active_adapters != names[:1]:
                    # one adapter for the whole batch: made the active one (a walk over the model
                    # once per switch) and run without peft's per-row hooks, which cost a walk over
                    # the model every forward (measured ~1.4x slower per request at c=1)
                    self.model.set_adapter(names[0], inference_mode=True)
            return self.model(**kw)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        running: list[_Seq] = []
        cache: Any = None  # native.Cache or a transformers DynamicCache: per layer [batch, heads, length, dim]
        mask: Any = None  # [batch, length] 1 where the cache holds a real token
        while True:
            new = self._admit(block=not running)
            if new is None:  # stopped and drained
                return
            self._active = len(running) + len(new)
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
            self._active = len(running)

    def _admit(self, block: bool) -> list[GenRequest] | None:
        room = self.max_batch_size - self._active
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

    def _text_of(self, s: _Seq, t: int) -> str:
        """The text token `t` adds ("" while a character's bytes are still to come)."""
        try:
            return str(s.stream.step(self.tok, t) or "")
        except Exception:  # a stream that met invalid UTF-8 cannot go on (vLLM restarts it too)
            from tokenizers.decoders import DecodeStream

            s.stream = DecodeStream(skip_special_tokens=True)
            return str(s.stream.step(self.tok, t) or "")

    def _emit(self, s: _Seq, t: int) -> bool:
        """Deliver token `t` to its request; True when the request is finished."""
        r = s.req
        if r.finished:  # failed while sampling
            return True
        if r.cancelled:
            self._finish(r, "cancelled")
            return True
        if t in self.stop_ids:  # counted as vLLM counts it (in completion_tokens), never shown
            r.completion_tokens += 1
            self._finish(r, "stop")
            return True
        piece = self._text_of(s, t)
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
        if piece:
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
        from tokenizers.decoders import DecodeStream

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
            budget = min(r.max_tokens, self.max_positions - len(encoded[-1]))
            stream = DecodeStream(ids=encoded[-1], skip_special_tokens=True)
            seqs.append(_Seq(r, budget, len(encoded[-1]), 0, gen, stream))
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
            out = self._forward(seqs, input_ids=ids_t, attention_mask=mask, position_ids=pos, use_cache=True)
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
            out = self._forward(
                seqs, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
        toks = self._sample(out.logits[:, -1, :], seqs)
        keep = []
        for i, (s, t) in enumerate(zip(seqs, toks, strict=True)):
            s.pos += 1
            if not self._emit(s, t):
                keep.append(i)
        return kvcache.select([seqs[i] for i in keep], keep, len(seqs), out.past_key_values, mask)
